"""`trainer merge`: fold a LoRA or IA3 adapter into a full-precision copy of its base.

Refused for soft-prompt methods (their virtual tokens are not a weight delta), for the
bottleneck adapter (a non-linear block), for QLoRA adapters (trained against nf4 weights)
and for a quantized target base.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from adapter_format.manifest import read_manifest, write_atomic

log = logging.getLogger(__name__)
MERGE_TOLERANCE = 1e-3


class MergeError(ValueError):
    """The adapter cannot be merged; the message says why."""


def merge(adapter: str | Path, output: str | Path, base_model: str | None = None,
          quantize: str = "none") -> Path:
    from transformers import AutoTokenizer

    from server.model_store import model_fingerprint
    from trainer.evaluation_cli import load_model_and_tokenizer

    manifest = read_manifest(adapter)
    method = manifest["training_method"]
    if quantize not in (None, "none"):
        raise MergeError(f"cannot merge into a {quantize} base: merging needs full-precision "
                         "weights (use --quantize none and quantize the merged model later)")
    if method == "qlora":
        raise MergeError("cannot merge a qlora adapter: it was trained against a 4-bit nf4 base, "
                         "so merging it into full-precision weights changes its outputs")
    if method not in ("lora", "ia3"):
        raise MergeError(f"cannot merge a {manifest['method']} adapter: only lora and ia3 "
                         "adapters are weight deltas that can be merged")
    model, _, _, base_path = load_model_and_tokenizer(str(adapter), base_model)
    if getattr(model.base_model.model.config, "quantization_config", None):
        raise MergeError("cannot merge into a quantized base model; give a full-precision base")
    probe = torch.arange(1, 17).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        before = model(input_ids=probe).logits
        merged = model.merge_and_unload(safe_merge=True)
        after = merged(input_ids=probe).logits
    diff = float((before - after).abs().max())
    if diff > MERGE_TOLERANCE:
        raise MergeError(f"merged model differs from base+adapter: max |logit diff| {diff:.3g} "
                         f"> {MERGE_TOLERANCE}")
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))

    def fill(tmp: Path) -> None:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    out_manifest = {
        "method": "merged", "merged_from": {"adapter": str(adapter), "method": manifest["method"],
                                             "manifest": manifest},
        "base_model": {**manifest["base_model"], "merged_fingerprint": None},
        "mergeable": False, "exports": {}, "metrics": {"merge_max_abs_diff": diff},
    }
    path = write_atomic(output, fill, out_manifest)
    log.info("merged %s into %s (max |logit diff| %.2g)", adapter, path, diff)
    out_manifest["base_model"]["merged_fingerprint"] = model_fingerprint(path)
    from adapter_format.manifest import update_manifest

    update_manifest(path, base_model=out_manifest["base_model"])
    _ = base_path
    return path
