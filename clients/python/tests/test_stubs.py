"""The checked-in stubs are what generate.py makes from the proto today."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIENT = HERE.parent
CHECKED_IN = CLIENT / "waquota" / "_proto" / "waquota" / "v1"


def test_checked_in_stubs_are_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("waquota_generate", CLIENT / "generate.py")
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = generate
    spec.loader.exec_module(generate)

    assert generate.installed_grpcio_tools() == generate.GRPCIO_TOOLS_VERSION, (
        "the stubs are compared with what the pinned grpcio-tools makes: "
        "pip install './clients/python[test]'"
    )
    written = generate.generate(tmp_path)
    assert {p.name for p in written} == set(generate.GENERATED)
    stale = [
        p.name for p in written if p.read_bytes() != (CHECKED_IN / p.name).read_bytes()
    ]
    assert not stale, (
        f"stale stubs {stale}: the proto changed; run `python3 clients/python/generate.py` "
        "and commit the result"
    )
