"""The benchmark's smoke run: ``scripts/bench --quick`` completes and reports every figure.

It asserts no speed (figures come from the benchmark, never from timed tests); it checks that
each phase produced its numbers, that the JSON matches the table, and that nothing it started is
left running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _started_by(mark: str) -> set[int]:
    """Processes that inherited ``mark`` in their environment: this run's, not another
    benchmark's running on the same machine."""
    token = f"PECD_BENCH_SMOKE={mark}".encode()
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if token in environ:
                pids.add(int(entry.name))
    return pids


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_quick_benchmark_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    mark = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_run.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=140, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PECD_BENCH_SMOKE": mark}, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    r = json.loads(out.read_text())

    for phase in ("certified", "half", "relay"):
        p = r[phase]
        assert p["acked"] > 0 and p["arrived"] > 0, phase
        for figure in ("submissions_per_s", "end_to_end_per_s", "server_cpu_s_per_msg",
                       "client_cpu_s_per_msg", "machine_cpu_s_per_msg"):
            assert p[figure] is not None, (phase, figure)
        for kind in ("data_end_to_250_s", "submit_to_arrival_s"):
            assert all(p[kind][q] is not None for q in ("p50", "p95", "p99")), (phase, kind)
        assert all(v > 0 for v in p["peak_rss"].values()), phase
    assert set(r["certified"]["peak_rss"]) == {"A", "B"}
    # certified and Postfix phases alternate (one pair in --quick); CPU outside the benchmark
    assert len(r["pairs"]) == 1 and r["pairs"][0]["certified_server_cpu_s_per_cycle"] > 0
    for phase in (r["certified"], r["half"], r["relay"]):
        assert phase["outside_cpu_s"] >= 0 and phase["benchmark_cpu_s"] > 0
    assert "certified_cpu_per_cycle_over_postfix_cpu_per_msg" in r
    assert r["half"]["offered_rate"] > 0
    if Path("/usr/sbin/postfix").exists() and os.geteuid() == 0:
        assert r["postfix"]["end_to_end_per_s"] is not None
        assert r["certified_cpu_per_cycle_over_postfix_cpu_per_msg"] > 0
        assert r["certified_cycles_per_s_over_postfix_msgs_per_s"] > 0
    big = r["big"]
    assert big["complete"] and set(big["growth_per_size"]) == {"A", "B"}
    deep = r["deep"]
    assert deep["queued"] == 500 and deep["rss_empty"] > 0 and deep["rss_queued"] > 0
    assert deep["drained"] >= 0 and deep["drain_rate_per_s"] is not None
    verdicts = {t["target"].split(" ")[0]: t["verdict"] for t in r["targets"]}
    assert len(r["targets"]) >= 5 and set(verdicts.values()) <= {"met", "MISSED", "n/a"}

    table = proc.stdout
    for heading in ("1. Max rate", "1b. Certified and Postfix", "2. Half rate", "3. Big message",
                    "4. Deep queue", "Targets"):
        assert heading in table
    assert not _started_by(mark), "the benchmark left processes running"
