"""Regenerate the committed gRPC/protobuf code from proto/rnnserve/v1/*.proto.

Usage: python scripts/gen_proto.py [OUT_DIR]   (default: proto/, i.e. in place)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every .proto under proto/rnnserve/v1 and return the files written."""
    sources = sorted((PROTO_ROOT / "rnnserve" / "v1").glob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    # mypy-protobuf's plugin sits beside this interpreter, which need not be on PATH (a venv's
    # python run by its full path, as the tests do).
    beside = Path(sys.executable).parent / "protoc-gen-mypy"
    plugin = str(beside) if beside.is_file() else shutil.which("protoc-gen-mypy")
    if plugin is None:
        raise SystemExit("protoc-gen-mypy not found: pip install -e '.[dev]'")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--plugin=protoc-gen-mypy={plugin}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        *(str(s.relative_to(PROTO_ROOT)) for s in sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")
    return sorted((out_dir / "rnnserve" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT
    for path in generate(target):
        print(path)
