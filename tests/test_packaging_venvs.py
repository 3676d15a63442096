"""Each role installs into a fresh virtual environment with `pip install .[ROLE]` and its
command runs there (slow: `make test-slow`). Versions are held to the pins of
requirements/ (as constraints), so torch is the pinned CPU build (2.13.0+cpu from the
local find-links), never a CUDA wheel; everything else comes from the configured indexes.
The CUDA role is resolved only (`pip install --dry-run`): its wheels need a GPU to run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_packaging import pins

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# role -> the commands that must succeed in its environment (run outside the repository)
SMOKE = {
    "": [["switchboard-client", "--help"],
         ["python", "-c", "import sys, clients; assert 'torch' not in sys.modules; "
          "import google.protobuf, grpc; print(grpc.__version__)"]],
    "server": [["switchboard", "serve", "--help"],
               ["python", "-c", "import server.app, server.engine.engine, server.adapters.lora"]],
    "trainer": [["trainer", "train", "--dry-run",
                 "--config", str(REPO / "trainer" / "configs" / "lora_date_iso.yaml"),
                 "output_dir=adapters/smoke"]],
    "onnx": [["python", "-c", "import onnxruntime, onnx, onnxscript; "
              "import server.onnx.engine, trainer.onnx_export"]],
    "quantize": [["python", "-c", "import bitsandbytes; import server.engine.model"]],
}


@pytest.fixture(scope="module")
def constraints(tmp_path_factory) -> Path:
    merged = pins(REPO / "requirements" / "cpu.txt") | pins(
        REPO / "requirements" / "runtime-cuda.txt")
    path = tmp_path_factory.mktemp("pins") / "constraints.txt"
    path.write_text("".join(f"{name}=={version}\n" for name, version in merged.items()))
    return path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project built once, out of the source tree's way."""
    out = tmp_path_factory.mktemp("wheel")
    src = tmp_path_factory.mktemp("src") / "switchboard"  # builds leave build/ behind
    skip_everywhere = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache")
    top_level = {".venv", ".git", "build", "adapters", "runs"}  # never inside the packages

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = set(skip_everywhere(directory, names))
        return skipped | (top_level & set(names) if Path(directory) == REPO else set())

    shutil.copytree(REPO, src, ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(src)], check=True, timeout=600)
    (path,) = out.glob("switchboard-*.whl")
    return path


def venv(where: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=300)
    return where / "bin"


def pip_install(bin_dir: Path, wheel: Path, role: str, constraints: Path, *extra: str) -> str:
    target = f"{wheel}[{role}]" if role else str(wheel)
    env = {**os.environ, "PIP_CONSTRAINT": str(constraints)}
    r = subprocess.run([str(bin_dir / "pip"), "install", "--quiet", *extra, target],
                       capture_output=True, text=True, timeout=1800, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("role", list(SMOKE), ids=lambda r: r or "client")
def test_a_role_installs_alone_and_its_command_runs(role, wheel, constraints, tmp_path):
    bin_dir = venv(tmp_path / "venv")
    pip_install(bin_dir, wheel, role, constraints)
    for cmd in SMOKE[role]:
        exe = str(bin_dir / cmd[0])
        r = subprocess.run([exe, *cmd[1:]], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}{r.stderr[-2000:]}"
    installed = subprocess.run([str(bin_dir / "pip"), "list", "--format=json"],
                               capture_output=True, text=True, check=True).stdout
    versions = {p["name"].lower(): p["version"] for p in json.loads(installed)}
    if role:
        assert versions["torch"].endswith("+cpu"), versions["torch"]  # never a CUDA wheel
        assert not any(n.startswith("nvidia-") for n in versions)
    else:
        assert "torch" not in versions and "numpy" not in versions
    assert "pytest" not in versions  # roles carry no test tools


def test_the_cuda_role_resolves_to_onnxruntime_gpu_only(wheel, constraints, tmp_path):
    bin_dir = venv(tmp_path / "venv")
    report = tmp_path / "report.json"
    pip_install(bin_dir, wheel, "cuda", constraints, "--dry-run", "--report", str(report))
    chosen = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert {"onnxruntime-gpu", "bitsandbytes", "torch"} <= chosen
    assert "onnxruntime" not in chosen
