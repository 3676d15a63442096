"""The committed gRPC stubs are what protos/generate.py makes from the .proto today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_current(tmp_path):
    subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), str(tmp_path)],
                   check=True)
    for name in ("switchboard_pb2.py", "switchboard_pb2.pyi", "switchboard_pb2_grpc.py"):
        fresh = (tmp_path / "switchboard" / "v1" / name).read_text()
        committed = (REPO / "switchboard" / "v1" / name).read_text()
        assert fresh == committed, f"switchboard/v1/{name} is stale: run `make protos`"
