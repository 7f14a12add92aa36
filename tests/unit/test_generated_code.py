"""The committed protobuf/gRPC code is exactly what the .proto generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    # A separate process: grpc_tools' protoc and TensorFlow's protobuf do not share one process.
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = sorted((tmp_path / "rnnserve" / "v1").glob("*_pb2*"))
    assert fresh, "protoc generated nothing"
    committed = ROOT / "proto" / "rnnserve" / "v1"
    for path in fresh:
        ours = committed / path.name
        assert ours.is_file(), f"{path.name} is generated but not committed"
        if ours.read_bytes() != path.read_bytes():
            pytest.fail(f"{path.name} differs from the .proto; run `python scripts/gen_proto.py`")
    stale = {p.name for p in committed.glob("*_pb2*")} - {p.name for p in fresh}
    assert not stale, f"committed files no longer generated: {sorted(stale)}"
