#!/usr/bin/env python3
"""Regenerates the gRPC stubs of waquota/_proto from proto/waquota/v1/waquota.proto.

    python3 clients/python/generate.py            # rewrite the checked-in stubs
    python3 clients/python/generate.py --out DIR  # write them under DIR instead (the test does)

Needs grpcio-tools (the `test` extra pins the version the checked-in stubs were made with).
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PROTO_ROOT = REPO / "proto"
PROTO = "waquota/v1/waquota.proto"
# The stubs live inside the client package, so the absolute import protoc writes for the
# proto's own path (`from waquota.v1 import ...`) must point into the package instead.
PACKAGE_PREFIX = "waquota._proto"
GENERATED = ("waquota_pb2.py", "waquota_pb2.pyi", "waquota_pb2_grpc.py")
# The generator the checked-in stubs were made with (pinned in pyproject.toml's `test` extra):
# another version writes other version checks into them.
GRPCIO_TOOLS_VERSION = "1.85.4"


def installed_grpcio_tools() -> str:
    from importlib.metadata import version

    return version("grpcio-tools")


def generate(out: Path) -> list[Path]:
    """Writes the stubs to out/waquota/v1/ and returns their paths."""
    from grpc_tools import protoc
    import grpc_tools

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as raw:
        raw_dir = Path(raw)
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={raw_dir}",
                f"--pyi_out={raw_dir}",
                f"--grpc_python_out={raw_dir}",
                str(PROTO_ROOT / PROTO),
            ]
        )
        if code != 0:
            raise SystemExit(f"generate.py: protoc failed with exit code {code}")
        target = out / "waquota" / "v1"
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            text = (raw_dir / "waquota" / "v1" / name).read_text()
            text = re.sub(
                r"^from waquota\.v1 import ",
                f"from {PACKAGE_PREFIX}.waquota.v1 import ",
                text,
                flags=re.MULTILINE,
            )
            path = target / name
            path.write_text(text)
            written.append(path)
    for package in (out / "waquota", target):
        init = package / "__init__.py"
        if not init.exists():
            init.write_text("")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=HERE / "waquota" / "_proto",
        help="directory to write waquota/v1/*.py into (default: the package's _proto)",
    )
    args = parser.parse_args(argv)
    if installed_grpcio_tools() != GRPCIO_TOOLS_VERSION:
        print(
            f"generate.py: grpcio-tools {installed_grpcio_tools()} is installed; the stubs are made "
            f"with {GRPCIO_TOOLS_VERSION} (pip install 'grpcio-tools=={GRPCIO_TOOLS_VERSION}', or "
            "change the pin here and in pyproject.toml together)",
            file=sys.stderr,
        )
        return 1
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
