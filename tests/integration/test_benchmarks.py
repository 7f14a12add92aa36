"""The Predict benchmark still runs end to end (its servers, load generator and compute limit), in
a few seconds per server instead of minutes. Its figures are not judged here (a shared CI machine
cannot measure them); that every server answered, without errors, and the ratios came out is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVERS = ["rnnserve", "rnnserve-cp", "careful", "echo", "frontdoor"]


@pytest.mark.slow
def test_bench_predict_smoke(tmp_path: Path) -> None:
    argv = [
        sys.executable,
        str(REPO / "benchmarks" / "bench_predict.py"),
        "--servers",
        *SERVERS,
        "--concurrency",
        "1",
        "4",
        "--warmup",
        "0.5",
        "--settle",
        "0",
        "--duration",
        "1",
        "--prime",
        "0",
        "--compute-seconds",
        "0.5",
        "--results-dir",
        str(tmp_path),
        "--rnnserve-arg=--no-warmup",  # starts in seconds; the figures are not judged here
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads((tmp_path / "predict.json").read_text())
    servers = payload["results"]["servers"]
    assert sorted(servers) == sorted(SERVERS)
    for kind, entry in servers.items():
        assert sorted(entry["levels"]) == ["1", "4"], kind
        for level in entry["levels"].values():
            assert level["errors"] == {}, (kind, level["errors"])
            assert level["completed"] > 0, kind
            assert 0 < level["p50_ms"] <= level["p99_ms"], kind
    assert payload["results"]["compute_limit"]["sequences_per_second"] > 0
    ratios = payload["ratios"]
    for key in (
        "rnnserve_vs_limit",
        "rnnserve_vs_careful",
        "p50_gap_ms",
        "rnnserve_vs_frontdoor",
        "frontdoor_vs_echo",
    ):
        assert key in ratios, key
    assert set(ratios["compute_process"]) == {"vs_limit", "vs_careful", "p50_gap_ms"}
    table = (tmp_path / "predict.md").read_text()
    assert "(f) rnnserve front door only" in table
    assert "rnnserve / min(compute limit, transport limit)" in table
    assert "(a') with `--compute-process`" in table
