"""Generate the Python protobuf and gRPC code from proto/lmforge/v1.

One command produces it (`make proto`, or `python -m lmforge.contracts.codegen`),
with the pinned grpcio-tools, and tests/libs/test_contracts.py fails when the
committed code is stale. protoc names the modules after the proto package
(`lmforge.v1`), which would collide with our own `lmforge` package, so the
generated imports are rewritten to `lmforge.contracts.v1`.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
PROTO_ROOT = REPO_ROOT / "proto"
OUTPUT_DIR = Path(__file__).resolve().parent / "v1"
_IMPORT = re.compile(r"^from lmforge\.v1 import", re.MULTILINE)


def generate(into: Path) -> list[Path]:
    """Run protoc over every .proto file and write the fixed-up modules to `into`."""
    from grpc_tools import protoc  # dev-only dependency, pinned in pyproject

    sources = sorted((PROTO_ROOT / "lmforge" / "v1").glob("*.proto"))
    if not sources:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / 'lmforge' / 'v1'}")
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(s.relative_to(PROTO_ROOT)) for s in sources],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed; see the messages above")
        into.mkdir(parents=True, exist_ok=True)
        written = []
        for produced in sorted((Path(tmp) / "lmforge" / "v1").iterdir()):
            text = _IMPORT.sub("from lmforge.contracts.v1 import", produced.read_text())
            target = into / produced.name
            target.write_text(text)
            written.append(target)
        (into / "__init__.py").write_text('"""Generated from proto/lmforge/v1. Do not edit."""\n')
        written.append(into / "__init__.py")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUTPUT_DIR)
    args = parser.parse_args(argv)
    if args.out == OUTPUT_DIR and OUTPUT_DIR.exists():
        shutil.rmtree(OUTPUT_DIR)
    for path in generate(args.out):
        print(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
