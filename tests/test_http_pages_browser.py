"""The pages in a real headless Chromium (Debian's chromium and chromium-driver, driven by
selenium): verify a receipt by uploading it, sign in with the form, read one's messages and a
message's timeline. A screenshot of each page is kept as a test artefact (in $PECD_ARTEFACTS,
else the test's temporary directory)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from .conftest import ProviderDir, wait_for
from .http_support import api, message, token_for

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                reason="needs Debian's chromium and chromium-driver (scripts/setup)")


def _browse(base: str, receipt: Path, shots: Path) -> dict[str, str]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=DriverService(executable_path=str(DRIVER)), options=options)
    seen: dict[str, str] = {}

    def arrive(title: str) -> None:  # a click returns before the next page has loaded
        WebDriverWait(driver, 30).until(ec.title_is(f"{title} - pecd"))

    try:
        driver.get(base + "/")
        driver.find_element(By.LINK_TEXT, "Verify a receipt or envelope").click()
        arrive("Verify a receipt")
        driver.find_element(By.ID, "message").send_keys(str(receipt))
        driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        arrive("Verdict")
        seen["verdict"] = driver.find_element(By.CSS_SELECTOR, "[role=status]").text
        driver.save_screenshot(str(shots / "pecd-verify.png"))

        driver.get(base + "/login")
        arrive("Sign in")
        driver.find_element(By.ID, "address").send_keys("alice@a.test")
        driver.find_element(By.ID, "password").send_keys("alice-secret")
        driver.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
        arrive("Messages of alice@a.test")
        seen["my_title"] = driver.find_element(By.TAG_NAME, "h1").text
        seen["my"] = driver.find_element(By.TAG_NAME, "main").text
        driver.save_screenshot(str(shots / "pecd-my-messages.png"))
        driver.find_element(By.LINK_TEXT, "Contratto via browser").click()
        arrive("Message")
        seen["timeline"] = driver.find_element(By.TAG_NAME, "main").text
        driver.save_screenshot(str(shots / "pecd-timeline.png"))
        driver.find_element(By.CSS_SELECTOR, "header form button[type=submit]").click()  # sign out
        arrive("pecd")
        seen["after_logout"] = driver.current_url
    finally:
        driver.quit()
    return seen


def test_pages_in_headless_chromium(two_providers: tuple[ProviderDir, ProviderDir],
                                    tmp_path: Path) -> None:
    a, b = two_providers
    token = token_for(a, "alice@a.test")
    shots = Path(os.environ.get("PECD_ARTEFACTS", str(tmp_path)))
    shots.mkdir(parents=True, exist_ok=True)

    async def scenario() -> dict[str, str]:
        async with api(a, b) as client:
            status, _, _ = await client.call("POST", "/api/v1/messages", token=token,
                                             json_body=message(subject="Contratto via browser"))
            assert status == 202
            await wait_for(lambda: len(a.messages("alice@a.test")) == 2)
            receipt = tmp_path / "receipt.eml"
            receipt.write_bytes(a.messages("alice@a.test")[0])
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, _browse, client.base, receipt, shots)

    seen = asyncio.run(scenario())
    assert seen["verdict"].startswith("VALID")
    assert seen["my_title"] == "Messages of alice@a.test"
    assert "Contratto via browser" in seen["my"] and "bob@b.test" in seen["my"]
    assert "bob@b.test (certificato)" in seen["timeline"] and "accepted" in seen["timeline"]
    assert seen["after_logout"].endswith("/")
    for name in ("pecd-verify.png", "pecd-my-messages.png", "pecd-timeline.png"):
        assert (shots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
