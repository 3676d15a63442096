"""Packaging: the roles (extras) of pyproject.toml agree with the pins in requirements/,
their lower bounds are ones the committed stubs accept, and the client imports without
torch. tests/test_packaging_venvs.py installs each role into a fresh environment (slow)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
REQS = REPO / "requirements"
ROLES = {"server", "trainer", "onnx", "quantize", "cuda", "plot", "bench", "dev"}
BENCH_ONLY = {"sentencepiece"}  # the bench role's own, pinned in requirements/bench.txt


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pins(path: Path) -> dict[str, str]:
    """{name: version} pinned in a requirements file, following `-r` includes."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            out |= pins(path.parent / line[3:].strip())
        elif line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not an exact pin"
            out[name.strip().lower()] = version.strip()
    return out


def role(name: str | None) -> list[Requirement]:
    """The requirements of a role, self-references (switchboard[...]) expanded."""
    p = project()
    reqs = [Requirement(r) for r in (p["dependencies"] if name is None
                                     else p["optional-dependencies"][name])]
    out: list[Requirement] = []
    for r in reqs:
        if r.name == p["name"]:
            for extra in r.extras:
                out += role(extra)
        else:
            out.append(r)
    return out if name is None else role(None) + out


def names(reqs: list[Requirement]) -> set[str]:
    return {r.name.lower() for r in reqs}


def test_the_roles_are_the_documented_ones():
    assert set(project()["optional-dependencies"]) == ROLES


def test_the_client_alone_is_grpc_and_protobuf():
    assert names(role(None)) == {"grpcio", "grpcio-health-checking", "protobuf"}


def test_lower_bounds_are_what_the_committed_stubs_accept():
    pb2 = (REPO / "switchboard" / "v1" / "switchboard_pb2.py").read_text()
    protobuf = re.search(r"Protobuf Python Version: (\S+)", pb2).group(1)
    grpc_stub = (REPO / "switchboard" / "v1" / "switchboard_pb2_grpc.py").read_text()
    grpc_version = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_stub).group(1)
    bounds = {r.name: r.specifier for r in role(None)}
    for name, needed in (("protobuf", protobuf), ("grpcio", grpc_version)):
        lowest = min(Version(s.version) for s in bounds[name] if s.operator == ">=")
        assert lowest >= Version(needed), f"{name} >= {lowest}: the stubs need {needed}"


def test_every_pin_belongs_to_a_role_and_satisfies_its_bound():
    dev = pins(REQS / "cpu.txt")
    every = {r.name.lower(): r for name in ROLES for r in role(name)}
    assert set(dev) <= set(every) | {"onnxruntime-gpu"}, set(dev) - set(every)
    for name, req in every.items():
        if name == "onnxruntime-gpu" or name in BENCH_ONLY:
            continue
        assert name in dev, f"role requirement {name} has no pin in requirements/cpu.txt"
        assert req.specifier.contains(dev[name], prereleases=True), (name, dev[name])
    bench = pins(REQS / "bench.txt")
    assert BENCH_ONLY == names(role("bench")) - names(role("server"))
    assert not BENCH_ONLY & set(dev), "benchmark-only packages stay out of the dev set"
    for name in BENCH_ONLY:
        assert every[name].specifier.contains(bench[name]), (name, bench[name])
    cuda = pins(REQS / "runtime-cuda.txt")
    assert every["onnxruntime-gpu"].specifier.contains(cuda["onnxruntime-gpu"])


def test_each_role_has_what_its_commands_import():
    assert {"torch", "transformers", "peft", "prometheus-client", "grpcio-reflection",
            "gguf"} <= names(role("server"))
    assert {"tensorboard", "sacrebleu", "rouge-score"} <= names(role("trainer"))
    assert "onnxruntime" in names(role("onnx"))
    assert "bitsandbytes" in names(role("quantize"))
    cuda = names(role("cuda"))
    assert "onnxruntime-gpu" in cuda and "onnxruntime" not in cuda
    assert {"pytest", "ruff", "hypothesis", "tensorboard", "onnxruntime",
            "bitsandbytes", "matplotlib"} <= names(role("dev"))


def test_runtime_images_pin_runtime_roles_only():
    runtime = names(role("server")) | names(role("quantize")) | {"onnx", "onnxscript"}
    cpu_image, cuda_image = pins(REQS / "runtime-cpu.txt"), pins(REQS / "runtime-cuda.txt")
    assert set(cpu_image) == runtime | {"onnxruntime"}
    assert set(cuda_image) == runtime | {"onnxruntime-gpu"}


def test_importing_the_client_does_not_import_torch():
    code = ("import sys, clients, clients.cli, clients.loadtest, clients.aio\n"
            "heavy = {'torch', 'numpy', 'transformers', 'server', 'yaml'} & set(sys.modules)\n"
            "print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("role_name", sorted(ROLES))
def test_the_pins_of_a_role_are_consistent(role_name):
    """No role names a package twice with conflicting bounds."""
    seen: dict[str, Requirement] = {}
    for r in role(role_name):
        if r.name in seen:
            assert str(r.specifier) == str(seen[r.name].specifier), r.name
        seen[r.name] = r
