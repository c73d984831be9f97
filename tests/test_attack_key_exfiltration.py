"""Key exfiltration: someone who can run pecd's commands, read its configuration and even knows
the token PIN tries to get the provider's private key out. The token refuses: the key was made
(or imported) sensitive and not extractable, so no attribute, export or wrap yields it; and the
PIN itself never shows in pecd's output or errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11x

from pecd.config import ConfigError
from pecd.trust import keys, pki

from .conftest import pecd
from .hsm_support import MODULE, USER_PIN, Token, new_token


@pytest.fixture
def token(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Token:
    return new_token(tmp_path_factory.getbasetemp() / "softhsm", tmp_path)


@pytest.mark.parametrize("how", ["generated", "imported"])
def test_attack_key_exfiltration_with_the_pin_yields_no_key_material(
        token: Token, tmp_path: Path, how: str) -> None:
    if how == "generated":
        out = pecd("keys", "generate", "--pkcs11", token.uri("provider"), "--module", str(MODULE),
                   "--pin-file", str(token.pin_file), "--name", "P", "--email", "p@a.test",
                   "--csr", str(tmp_path / "r.csr"))
    else:
        pki.write_key(tmp_path / "old.key", pki.new_key("rsa"))
        out = pecd("keys", "import", str(tmp_path / "old.key"), "--pkcs11", token.uri("provider"),
                   "--module", str(MODULE), "--pin-file", str(token.pin_file))
    assert USER_PIN not in out
    key = keys.load_token_key(token.uri("provider"), token.options)

    def attack(session: Any) -> None:  # a logged-in session, as someone with the PIN has
        priv = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="provider")
        for secret in (Attribute.PRIVATE_EXPONENT, Attribute.PRIME_1, Attribute.PRIME_2):
            with pytest.raises(p11x.AttributeSensitive):
                priv[secret]
        assert priv[Attribute.SENSITIVE] and not priv[Attribute.EXTRACTABLE]
        with pytest.raises(p11x.PKCS11Error):  # and the flags cannot be turned back
            priv[Attribute.EXTRACTABLE] = True
        wrapping = session.generate_key(KeyType.AES, 256, store=False,
                                        template={Attribute.WRAP: True})
        with pytest.raises(p11x.PKCS11Error):  # not even wrapped under a key the attacker holds
            wrapping.wrap_key(priv, mechanism=Mechanism.AES_KEY_WRAP_PAD)

    key.token.run(attack)
    with pytest.raises(TypeError):
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())


def test_attack_key_exfiltration_pin_never_echoed_by_config_errors(tmp_path: Path) -> None:
    from .conftest import make_provider

    p = make_provider(tmp_path, "a.test", tmp_path / "ca")
    text = p.conf.read_text()
    p.conf.write_text(text.replace("[keys]\n", f'[keys]\npin = "{USER_PIN}"\n'))
    with pytest.raises(ConfigError) as caught:
        p.config  # noqa: B018
    assert USER_PIN not in str(caught.value)
    out = p.cli("status", ok=False)
    assert USER_PIN not in out and "a PIN must not be written" in out
