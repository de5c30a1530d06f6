"""Generate the Python gRPC code for citytwin's public API from proto/citytwin/v1/*.proto.

The generated modules live beside their .proto sources and are installed as the
`citytwin.v1` package (pyproject maps `citytwin` to `proto/citytwin`). They are committed so
that a checkout works without protoc; tests/test_generated_stubs.py fails when they are stale.

    python proto/generate.py            # regenerate in place
    python proto/generate.py --out DIR  # write into DIR instead (used by the staleness test)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
API_DIR = PROTO_ROOT / "citytwin" / "v1"


def proto_sources() -> list[Path]:
    """The .proto files of the public API, in a stable order."""
    return sorted(API_DIR.glob("*.proto"))


def generate(out_dir: Path) -> None:
    """Write *_pb2.py, *_pb2_grpc.py and their .pyi stubs for every API .proto into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # protoc finds the mypy plugins on PATH; they sit beside this interpreter in the venv.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_sources()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT)
    generate(parser.parse_args().out)


if __name__ == "__main__":
    sys.exit(main())
