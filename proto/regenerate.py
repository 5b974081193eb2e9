"""Regenerate the Python modules from the `.proto` files beside them.

Policy: generated code is committed (so installing llamafleet needs no protoc), and
`tests/unit/proto/test_generated_code.py` regenerates into a temporary directory and fails
when the committed files differ. Run after editing a `.proto`:

    python -m llamafleet.proto.regenerate          # rewrite the committed modules
    python -m llamafleet.proto.regenerate --check  # exit 1 if they are stale

Needs the `dev` extra (grpcio-tools).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
# The import path the generated modules must use: protoc derives it from the virtual path.
VIRTUAL_ROOT = "llamafleet/proto"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generated_names(proto: Path) -> list[str]:
    stem = proto.stem
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]


def generate_into(out_dir: Path) -> list[Path]:
    """Run protoc over every .proto; return the paths of what it wrote, relative to out_dir."""
    from grpc_tools import protoc  # dev-only dependency, imported where it is needed

    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    virtual = [f"{VIRTUAL_ROOT}/{p.relative_to(PROTO_ROOT).as_posix()}" for p in proto_files()]
    args = [
        "protoc",
        f"-I{VIRTUAL_ROOT}={PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *virtual,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    written: list[Path] = []
    for proto in proto_files():
        rel_dir = proto.parent.relative_to(PROTO_ROOT)
        written += [rel_dir / name for name in generated_names(proto)]
    return written


def stale_files() -> list[str]:
    """Committed generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        stale = []
        for rel in generate_into(out):
            fresh = out / VIRTUAL_ROOT / rel
            committed = PROTO_ROOT / rel
            if not committed.exists() or not filecmp.cmp(fresh, committed, shallow=False):
                stale.append(str(rel))
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: proto/{name}", file=sys.stderr)
        return 1 if stale else 0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for rel in generate_into(out):
            (PROTO_ROOT / rel).write_bytes((out / VIRTUAL_ROOT / rel).read_bytes())
            print(f"wrote proto/{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
