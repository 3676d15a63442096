"""QLoRA's 4-bit base is the same base in training, in evaluation and after a reload.

bitsandbytes repacks a 4-bit layer's weight for a bf16 kernel the first time it runs in eval
mode on a CPU with avx512_bf16, and unpacks it (re-quantizing its scales) when the state
dict is saved. The trainer pins every 4-bit layer to one kernel path; these tests check the
property that broke on such CPUs on every CPU, and reproduce the repack cycle with
bitsandbytes' own conversion functions (plain tensor code that runs on any CPU) to show the
reload check catches it."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import (
    _convert_weight_packed_for_cpu,
    _convert_weight_packed_for_cpu_inverse,
)
from trainer_fixtures import base_overrides

from trainer.config import load_config
from trainer.methods import build_trainable, load_base
from trainer.train import ArtifactError, train, verify_reload


def _4bit_layers(model) -> dict[str, bnb.nn.Linear4bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _state(layer) -> dict[str, torch.Tensor]:
    return {"weight": layer.weight.data.clone(),
            **{k: v.clone() for k, v in layer.weight.quant_state.as_dict(packed=True).items()}}


def test_every_4bit_layer_is_pinned_to_one_kernel_path(tiny_base, monkeypatch):
    # as on a CPU with avx512_bf16, where bitsandbytes turns the repacking path on
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    layers = _4bit_layers(load_base(tiny_base, quantize="nf4"))
    assert len(layers) == 2 * 7  # two layers, seven projections each
    assert not any(m.support_avx512bf16_for_cpu for m in layers.values())


def test_evaluation_and_saving_leave_the_4bit_base_bit_identical(tiny_base, tmp_path):
    cfg = load_config(None, base_overrides(tiny_base, tmp_path, method="qlora"))
    model = build_trainable(cfg, tiny_base)
    before = {n: _state(m) for n, m in _4bit_layers(model).items()}
    ids = torch.tensor([[1, 5, 9, 11, 7, 3]])
    model.eval()
    with torch.no_grad():  # what the trainer's evaluation does between training steps
        model(input_ids=ids)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    # the gradient of q/k/v's and gate/up's LoRA reaches them only back through the 4-bit
    # o_proj and down_proj (lora_A's is zero while lora_B is at its zero init)
    first = [p.grad for n, p in model.named_parameters()
             if "layers.0." in n and "lora_B" in n and "o_proj" not in n
             and "down_proj" not in n]
    assert first and all(g is not None and g.abs().sum() > 0 for g in first)
    model.state_dict()  # what saving the adapter does
    for name, layer in _4bit_layers(model).items():
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False), name
        after = _state(layer)
        assert after.keys() == before[name].keys()
        assert all(torch.equal(after[k], before[name][k]) for k in after), name


@pytest.fixture(scope="module")
def qlora_artifact(tiny_base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora")
    cfg = load_config(None, base_overrides(tiny_base, tmp, method="qlora",
                                           eval_generate_max=0))
    manifest = train(cfg)
    return cfg, tmp / "adapters" / "out", manifest


def _probe(model):
    ids = torch.tensor([[1, 5, 9, 11, 7, 3], [1, 8, 4, 6, 2, 2]])
    return {"input_ids": ids, "attention_mask": torch.tensor([[1] * 6, [1] * 5 + [0]])}


def test_reload_check_passes_on_the_trained_model(qlora_artifact, tiny_base):
    cfg, out, manifest = qlora_artifact
    metrics = manifest["metrics"]
    assert 0 <= metrics["reload_max_abs_diff"] <= metrics["reload_tolerance"]


def test_reload_check_catches_a_repacked_base(qlora_artifact, tiny_base):
    """One repack-and-unpack cycle, as bitsandbytes runs it on an avx512_bf16 CPU: the
    weight bytes come back, the block scales do not, and the reload check says so."""
    cfg, out, _ = qlora_artifact
    model = build_trainable(cfg, tiny_base)
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(out / "adapter_model.safetensors")))
    verify_reload(model, out, "qlora", tiny_base, _probe(model))  # the same model passes
    name, layer = next(iter(_4bit_layers(model).items()))
    w = layer.weight
    packed, state = _convert_weight_packed_for_cpu(w.data, w.quant_state)
    w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(packed, state)
    with pytest.raises(ArtifactError, match="not bit-identical") as err:
        verify_reload(model, out, "qlora", tiny_base, _probe(model))
    assert name in str(err.value)


def test_reload_check_catches_a_trained_tensor_that_was_not_saved(qlora_artifact, tiny_base):
    cfg, out, _ = qlora_artifact
    model = build_trainable(cfg, tiny_base)
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(out / "adapter_model.safetensors")))
    name, p = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        p.add_(1e-3)
    with pytest.raises(ArtifactError, match="not bit-identical") as err:
        verify_reload(model, out, "qlora", tiny_base, _probe(model))
    assert name in str(err.value)


def test_parameter_counts_are_the_base_plus_the_adapter(tiny_base, tmp_path):
    """A 4-bit tensor holds two parameters a byte; the manifest counts parameters, not bytes."""
    from trainer.auto import base_parameter_count

    counts = {}
    for method in ("lora", "qlora"):
        over = base_overrides(tiny_base, tmp_path / method, method=method, max_steps=1,
                              eval_generate_max=0, plot=False)
        m = train(load_config(None, over))["metrics"]
        counts[method] = (m["trainable_parameters"], m["total_parameters"])
    assert counts["qlora"] == counts["lora"]
    trainable, total = counts["lora"]
    assert total == base_parameter_count(tiny_base) + trainable
