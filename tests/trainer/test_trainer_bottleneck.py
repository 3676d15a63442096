"""The bottleneck adapter: our module, its file format and the reference the server will use."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import adapter_format.bottleneck as fmt
from trainer.methods import bottleneck as bn


@pytest.fixture
def model(tiny_base):
    return AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()


def _ids():
    return torch.tensor([[5, 17, 33, 101, 7, 9]])


def test_fresh_adapter_is_identity_then_changes_output(model):
    ref = model(_ids()).logits
    adapters = bn.apply_bottleneck(model, bn.config_for(model, bottleneck_size=8))
    assert torch.equal(model(_ids()).logits, ref)
    with torch.no_grad():
        adapters.layers[0]["mlp"].up.weight.normal_()
    assert not torch.allclose(model(_ids()).logits, ref)
    bn.remove_bottleneck(model)
    assert torch.equal(model(_ids()).logits, ref)
    assert "bottleneck" not in dict(model.named_children())


def test_tensor_names_and_shapes_match_the_documented_format(model, tmp_path):
    cfg = bn.config_for(model, bottleneck_size=8, positions=("attn", "mlp"))
    adapters = bn.apply_bottleneck(model, cfg)
    bn.save_bottleneck(tmp_path, adapters)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    h = model.config.hidden_size
    want = {}
    for i in range(model.config.num_hidden_layers):
        for p in ("attn", "mlp"):
            want |= {f"layers.{i}.{p}.norm.weight": (h,), f"layers.{i}.{p}.down.weight": (8, h),
                     f"layers.{i}.{p}.down.bias": (8,), f"layers.{i}.{p}.up.weight": (h, 8),
                     f"layers.{i}.{p}.up.bias": (h,)}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == want
    saved = json.loads((tmp_path / "bottleneck_config.json").read_text())
    assert saved["adapter_type"] == "bottleneck" and saved["format_version"] == 1
    assert saved["positions"] == ["attn", "mlp"] and saved["hidden_size"] == h


def test_reference_formula_matches_the_hooks(model, tmp_path):
    """A hand-written forward using only the format's formula equals the injected model."""
    cfg = bn.config_for(model, bottleneck_size=8)
    adapters = bn.apply_bottleneck(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in adapters.parameters():
            p.normal_(0, 0.2)
    bn.save_bottleneck(tmp_path, adapters)
    got = model(_ids()).logits
    bn.remove_bottleneck(model)
    config, state = bn.load_bottleneck(tmp_path)

    def weights(i, p):
        return {k.split(f"layers.{i}.{p}.", 1)[1]: v for k, v in state.items()
                if k.startswith(f"layers.{i}.{p}.")}

    hooks = []
    for i, layer in enumerate(bn.decoder_layers(model)):
        hooks.append(layer.self_attn.register_forward_hook(
            lambda m, a, out, i=i: (out[0] + fmt.bottleneck_delta(
                out[0], weights(i, "attn"), config.activation, config.norm_eps), *out[1:])))
        hooks.append(layer.mlp.register_forward_hook(
            lambda m, a, out, i=i: out + fmt.bottleneck_delta(
                out, weights(i, "mlp"), config.activation, config.norm_eps)))
    torch.testing.assert_close(model(_ids()).logits, got)
    for h in hooks:
        h.remove()


def test_load_rejects_mismatched_files(model, tmp_path):
    adapters = bn.apply_bottleneck(model, bn.config_for(model, bottleneck_size=8))
    bn.save_bottleneck(tmp_path, adapters)
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    state["layers.0.mlp.down.weight"] = torch.zeros(4, 64)
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"layers.0.mlp.down.weight has shape \(4, 64\)"):
        bn.load_bottleneck(tmp_path)
    cfg = json.loads((tmp_path / "bottleneck_config.json").read_text())
    (tmp_path / "bottleneck_config.json").write_text(json.dumps({**cfg, "num_layers": 3}))
    config = bn.BottleneckConfig.from_json((tmp_path / "bottleneck_config.json").read_text())
    with pytest.raises(ValueError, match="adapter has 3 layers, model has 2"):
        bn.apply_bottleneck(model, config)
    (tmp_path / "bottleneck_config.json").write_text(json.dumps({**cfg, "format_version": 9}))
    with pytest.raises(ValueError, match="format_version 9 is newer"):
        bn.load_bottleneck(tmp_path)


def test_format_module_imports_stay_light():
    """The server reads the format through this module: no trainer, no transformers."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(fmt.__file__).read_text())
    nodes = list(ast.walk(tree))
    roots = {(n.module or "").split(".")[0] for n in nodes if isinstance(n, ast.ImportFrom)}
    roots |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
              for a in n.names}
    assert roots <= {"__future__", "dataclasses", "json", "pathlib", "torch"}
