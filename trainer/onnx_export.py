"""Merge a hot adapter into its base and export it to ONNX with an explicit KV cache.

    export_onnx(adapter_dir, quantize="none"|"int8"|"int4", opset=17)

Steps: refuse what cannot be merged (soft prompts, bottleneck, 4-bit bases); load the base
in fp32 with the adapter through PEFT (the reference); merge it (`merge_and_unload`, safe
mode); export `ExportDecoder` as one graph; optionally quantize its weights with ONNX
Runtime's own tools (8- or 4-bit weight blocks through MatMulNBits); check parity
against the unmerged PEFT model on sample prompts (fed the reference's greedy tokens:
maximum logit difference and greedy agreement); only then move
the files to `<adapter>/onnx/<variant>/` and record the export in `switchboard.json`.
Everything is written in a hidden temporary directory first, so a failed export leaves
the adapter directory as it was.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapter_format.manifest import (  # noqa: F401  (adapter_content_hash re-exported)
    ArtifactError,
    adapter_content_hash,
    read_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

VARIANTS = {"none": "fp32", "int8": "int8", "int4": "int4"}
MERGEABLE = ("lora", "ia3")
SOFT_PROMPTS = ("prompt_tuning", "p_tuning", "prefix_tuning", "adaption_prompt")
SAMPLE_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "List three prime numbers and explain why they are prime.",
    "Translate 'good morning' into Spanish.",
)


class ExportError(ValueError):
    """The adapter cannot be exported; the message says why."""


class ParityError(ExportError):
    """The export was made but failed the parity check (the adapter is unchanged)."""


@dataclass(frozen=True)
class ParityConfig:
    """Limits an export must meet. Greedy agreement: the export is fed the unmerged
    PyTorch model's greedy tokens (teacher forcing) and agrees where its own greedy choice
    is the same token, over all steps of all prompts. (Free-running agreement, tokens
    before the first divergence, is recorded too; one near-tie early in a prompt zeroes
    the rest of it, so it judges a quantized export by luck.)"""

    new_tokens: int = 16
    max_logit_diff: float = 1e-2  # fp32 only: quantized exports are judged on tokens
    min_agreement: dict[str, float] | None = None

    def agreement_for(self, variant: str) -> float:
        table = self.min_agreement or {"fp32": 1.0, "int8": 0.95, "int4": 0.5}
        return table[variant]


def export_onnx(adapter_dir: str | Path, quantize: str = "none", opset: int = 17,
                base_model: str | None = None, parity: ParityConfig | None = None,
                prompts: tuple[str, ...] = SAMPLE_PROMPTS) -> dict[str, Any]:
    """Export; return the manifest record of the export (also written to the manifest)."""
    from server.model_store import model_fingerprint, resolve_base_model

    adapter = Path(adapter_dir).resolve()
    if quantize not in VARIANTS:
        raise ExportError(f"quantize {quantize!r} is not one of {', '.join(VARIANTS)}")
    if not 14 <= opset <= 21:
        raise ExportError(f"opset {opset} is out of range 14..21")
    variant = VARIANTS[quantize]
    parity = parity or ParityConfig()
    manifest = _read_manifest(adapter)
    method = _check_mergeable(adapter, manifest)
    base_path = Path(resolve_base_model(base_model or _base_of(adapter, manifest)))
    _check_base(base_path)
    fingerprint = model_fingerprint(base_path)
    theirs = (manifest.get("base_model") or {}).get("fingerprint")
    if theirs and theirs != fingerprint:
        raise ExportError(f"adapter was trained for base fingerprint {theirs}; {base_path} has "
                          f"{fingerprint}")

    t0 = time.perf_counter()
    reference, merged, tokenizer = _load_merged(base_path, adapter)
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    ref_tokens, ref_logits = _reference_greedy(reference, prompt_ids, parity.new_tokens)
    tmp = Path(tempfile.mkdtemp(prefix=f".onnx-{variant}.tmp-", dir=adapter))
    try:
        fp32 = tmp / "fp32" / "model.onnx"
        fp32.parent.mkdir()
        _export_graph(merged, fp32, opset)
        del merged, reference
        final = tmp / "out" / "model.onnx"
        final.parent.mkdir()
        if quantize == "none":
            os.replace(fp32, final)
        else:
            _quantize(fp32, final, quantize)
        shutil.rmtree(fp32.parent, ignore_errors=True)
        export_seconds = time.perf_counter() - t0
        figures = _parity(final, prompt_ids, ref_tokens, ref_logits)
        need = parity.agreement_for(variant)
        failed = figures["greedy_agreement"] < need or (
            variant == "fp32" and figures["max_abs_logit_diff"] > parity.max_logit_diff)
        figures.update(min_agreement=need, max_logit_diff_allowed=(
            parity.max_logit_diff if variant == "fp32" else None), passed=not failed)
        if failed:
            raise ParityError(
                f"parity check failed for the {variant} export: greedy agreement "
                f"{figures['greedy_agreement']:.3f} (needs {need}), max |logit diff| "
                f"{figures['max_abs_logit_diff']:.3g}"
                + (f" (allowed {parity.max_logit_diff})" if variant == "fp32" else "")
                + "; the adapter directory is unchanged")
        files = sorted(final.parent.iterdir())
        record = {
            "path": f"onnx/{variant}/model.onnx",
            "quantize": quantize,
            "opset": opset,
            "size_bytes": sum(f.stat().st_size for f in files),
            "export_seconds": round(export_seconds, 3),
            "adapter_hash": adapter_content_hash(adapter),
            "adapter_method": method,
            "base_model": {"path": str(base_path), "fingerprint": fingerprint},
            "parity": figures,
            "parity_config": asdict(parity),
            "onnxruntime": _ort_version(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _install(adapter, final.parent, variant, record, manifest, method, fingerprint,
                 base_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s as %s (%.1f MB, agreement %.3f, max |logit diff| %.3g)", adapter,
             variant, record["size_bytes"] / 1e6, figures["greedy_agreement"],
             figures["max_abs_logit_diff"])
    return record


# ---- checks -------------------------------------------------------------------------
def _read_manifest(adapter: Path) -> dict[str, Any]:
    if not (adapter / "adapter_config.json").is_file():
        raise ExportError(f"{adapter} is not an adapter directory (no adapter_config.json)")
    try:
        return read_manifest(adapter, missing_ok=True)
    except ArtifactError as e:
        raise ExportError(str(e)) from e


def _check_mergeable(adapter: Path, manifest: dict[str, Any]) -> str:
    """The adapter's method if it can be merged, else ExportError naming why not."""
    try:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{adapter}/adapter_config.json: unreadable ({e})") from e
    peft_type = str(cfg.get("peft_type", "")).lower()
    method = str(manifest.get("training_method") or manifest.get("method") or peft_type
                 or "unknown").lower()
    quant = str((manifest.get("base_model") or {}).get("quantization") or "").lower()
    if method == "qlora" or quant in ("nf4", "fp4", "int4"):
        raise ExportError(f"cannot export a {method} adapter trained against a 4-bit "
                          f"({quant or 'nf4'}) base: merging it into full-precision weights "
                          "changes its outputs")
    if method in SOFT_PROMPTS or peft_type in SOFT_PROMPTS:
        raise ExportError(f"cannot export a {method} adapter: its virtual tokens are not a "
                          "weight delta, so it cannot be merged (only lora and ia3 can)")
    if method not in MERGEABLE or peft_type not in MERGEABLE:
        raise ExportError(f"cannot export a {method} adapter (peft_type {peft_type or None!r}): "
                          "only lora and ia3 adapters can be merged")
    if manifest.get("mergeable") is False:
        raise ExportError("the adapter's manifest says it cannot be merged (mergeable: false)")
    return method


def _base_of(adapter: Path, manifest: dict[str, Any]) -> str | None:
    base = manifest.get("base_model") or {}
    if base.get("path") and Path(base["path"]).is_dir():
        return base["path"]
    if base.get("id"):
        return base["id"]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    return cfg.get("base_model_name_or_path") or None


def _check_base(base_path: Path) -> None:
    cfg_path = base_path / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    q = cfg.get("quantization_config") or {}
    if q.get("load_in_4bit") or q.get("load_in_8bit") or q.get("quant_method"):
        raise ExportError(f"base model {base_path} is quantized ({q.get('quant_method') or 'bnb'}"
                          "): the export merges into full-precision weights only")


# ---- model --------------------------------------------------------------------------
def _load_merged(base_path: Path, adapter: Path):
    """(unmerged PEFT model, merged HF model, tokenizer), all fp32 on the CPU."""
    import copy

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32).eval()
    reference = PeftModel.from_pretrained(base, str(adapter)).eval()
    merged = copy.deepcopy(reference).merge_and_unload(safe_merge=True).eval()
    return reference, merged, tokenizer


@torch.no_grad()
def _reference_greedy(model, prompts: list[list[int]], n: int):
    """Greedy tokens and the logits of each step of the unmerged model (no EOS stop)."""
    tokens, logits = [], []
    for ids in prompts:
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        toks, steps = [], []
        for _ in range(n):
            row = out.logits[0, -1].float()
            steps.append(row.numpy())
            toks.append(int(row.argmax()))
            out = model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=out.past_key_values,
                        use_cache=True)
        tokens.append(toks)
        logits.append(np.stack(steps))
    return tokens, logits


def _export_graph(merged, path: Path, opset: int) -> None:
    from server.onnx.graph import ExportDecoder, io_names

    model = ExportDecoder(merged)
    n = model.num_layers
    b, s, p = 2, 3, 4
    args = (torch.ones(b, s, dtype=torch.long), torch.arange(p, p + s).repeat(b, 1),
            torch.ones(b, p + s, dtype=torch.long),
            *[torch.zeros(b, model.num_kv_heads, p, model.head_dim) for _ in range(2 * n)])
    inputs, outputs = io_names(n)
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "sequence"},
                                       "position_ids": {0: "batch", 1: "sequence"},
                                       "attention_mask": {0: "batch", 1: "total"},
                                       "logits": {0: "batch"}}
    axes.update({name: {0: "batch", 2: "past"} for name in inputs[3:]})
    axes.update({name: {0: "batch", 2: "total"} for name in outputs[1:]})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript exporter: one pass, seconds, symbolic batch/sequence/past axes
        # (the dynamo exporter cannot express total = past + sequence as an input axis).
        torch.onnx.export(model, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, dynamo=False,
                          do_constant_folding=True)


def _quantize(src: Path, dst: Path, quantize: str) -> None:
    """Block quantization of the weights (MatMulNBits, blocks of 32 along the input, one
    scale each): 8 or 4 bits. With accuracy_level 4, ONNX Runtime's CPU kernel also
    rounds each input to int8 on the fly, one scale per block of 32 (docs/onnx.md; checked
    by benchmarks/onnx.py) -- finer than dynamic int8 quantization with one scale per
    activation tensor, which lost the default model to its outlier activations (max
    |logit diff| 14, a third of greedy tokens wrong)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=8 if quantize == "int8" else 4,
                             block_size=32, is_symmetric=True, accuracy_level=4)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)


def _parity(path: Path, prompts: list[list[int]], ref_tokens, ref_logits) -> dict[str, Any]:
    from server.onnx.session import OnnxDecoderSession

    sess = OnnxDecoderSession(path, threads=0)
    forced_agree = free_agree = total = mismatched = 0
    max_diff = 0.0
    for ids, want, want_logits in zip(prompts, ref_tokens, ref_logits, strict=True):
        got, got_logits = sess.greedy(ids, len(want), forced=want)
        forced_agree += sum(a == b for a, b in zip(got, want, strict=True))
        max_diff = max(max_diff, float(np.abs(got_logits - want_logits).max()))
        free, _ = sess.greedy(ids, len(want))
        prefix = next((i for i, (a, b) in enumerate(zip(free, want, strict=True)) if a != b),
                      len(want))
        free_agree += prefix
        mismatched += prefix < len(want)
        total += len(want)
    return {"max_abs_logit_diff": max_diff, "greedy_agreement": forced_agree / max(total, 1),
            "free_running_agreement": free_agree / max(total, 1), "greedy_tokens": total,
            "prompts": len(prompts), "prompts_diverged": mismatched}


# ---- install ------------------------------------------------------------------------
def _install(adapter: Path, files: Path, variant: str, record: dict[str, Any],
             manifest: dict[str, Any], method: str, fingerprint: str, base_path: Path) -> None:
    """Move the export to <adapter>/onnx/<variant>/ and record it in the manifest."""
    target = adapter / "onnx" / variant
    target.parent.mkdir(exist_ok=True)
    old = None
    if target.exists():
        old = target.with_name(f".{variant}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(files, target)
    if not manifest:
        manifest = {"manifest_version": 1, "method": method,
                    "base_model": {"path": str(base_path), "fingerprint": fingerprint},
                    "mergeable": True}
    exports = manifest.setdefault("exports", {})
    exports.setdefault("onnx", {})[variant] = record
    write_manifest(adapter, manifest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
