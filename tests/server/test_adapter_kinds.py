"""Each adapter kind's answers (server/adapters/kinds.py) on a real small adapter of its
type, and the hooks over the kinds computing what the per-type loops they replaced did."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from support import TINY_SPEC as SPEC
from support import make_bottleneck, make_lora, make_peft_adapter

from adapter_format.bottleneck import bottleneck_delta
from server.adapters.formats import BottleneckWeights, IA3Weights, PrefixWeights, PromptWeights
from server.adapters.hooks import AdapterHooks
from server.adapters.kinds import (
    ADAPTER_TYPES,
    CONFIG_FILES,
    METHODS,
    BottleneckKind,
    IA3Kind,
    LoraKind,
    PrefixTuningKind,
    PromptTuningKind,
    PTuningKind,
    method_of,
    read_adapter,
)
from server.adapters.loader import config_summary
from server.adapters.lora import AdapterError, LoraWeights, read_lora
from server.adapters.slots import group_modules

GROUPS = group_modules(SPEC)
QKV = SPEC.q_size + 2 * SPEC.kv_size  # width of the qkv projection's output


@pytest.fixture(scope="module")
def root(tiny_model, tmp_path_factory):
    from peft import (
        IA3Config,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
        TaskType,
    )

    root = tmp_path_factory.mktemp("kinds")
    lm = TaskType.CAUSAL_LM
    make_lora(tiny_model, root / "lora", r=4, targets=["q_proj", "v_proj"], seed=1)
    make_peft_adapter(tiny_model, root / "ia3", IA3Config(
        task_type=lm, target_modules=["k_proj", "v_proj", "down_proj"],
        feedforward_modules=["down_proj"]), 2)
    make_peft_adapter(tiny_model, root / "prompt", PromptTuningConfig(
        task_type=lm, num_virtual_tokens=5), 3)
    make_peft_adapter(tiny_model, root / "ptuning", PromptEncoderConfig(
        task_type=lm, num_virtual_tokens=4, encoder_hidden_size=32), 4)
    make_peft_adapter(tiny_model, root / "prefix", PrefixTuningConfig(
        task_type=lm, num_virtual_tokens=6), 5)
    make_bottleneck(tiny_model, root / "bottleneck", 6)
    return root


def _flags(kind) -> tuple[bool, bool, bool]:
    return kind.uses_lora_slot, kind.range_ops, kind.writes_prefix


def _unchanged_by_range_ops(kind, weights) -> None:
    """A kind without range_ops leaves every projection's input and output alone."""
    for group, modules in GROUPS.items():
        assert kind.input_scale(weights, 0, group) is None
        out = torch.randn(4, 8)
        before = out.clone()
        kind.linear(weights, 0, group, out, 0, 4, modules)
        assert torch.equal(out, before)


def test_one_kind_per_method_and_the_directory_says_which(root):
    assert METHODS == ("lora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning",
                       "bottleneck")
    assert all(kind.method == method for method, kind in ADAPTER_TYPES.items())
    assert CONFIG_FILES == ("adapter_config.json", "bottleneck_config.json")
    found = {name: method_of(root / name) for name in
             ("lora", "ia3", "prompt", "ptuning", "prefix", "bottleneck")}
    assert found == {"lora": "lora", "ia3": "ia3", "prompt": "prompt_tuning",
                     "ptuning": "p_tuning", "prefix": "prefix_tuning",
                     "bottleneck": "bottleneck"}
    with pytest.raises(AdapterError, match="no adapter_config.json or bottleneck_config.json"):
        method_of(root)


def test_lora_kind(root):
    kind = ADAPTER_TYPES["lora"]
    assert kind is LoraKind
    weights = kind.read(root / "lora", SPEC)
    assert isinstance(weights, LoraWeights) and weights.rank == 4
    ref = read_lora(root / "lora", SPEC)
    assert weights.modules.keys() == ref.modules.keys()
    assert all(torch.equal(a, ra) and torch.equal(b, rb) and s == rs for (a, b, s), (ra, rb, rs)
               in zip(weights.modules.values(), ref.modules.values(), strict=True))
    assert _flags(kind) == (True, False, False)  # its weights go into a slot table
    assert config_summary(root / "lora", kind) == (4, ["q_proj", "v_proj"])
    assert kind.virtual_tokens(weights) == 0 and kind.input_embeddings(weights) is None
    with pytest.raises(TypeError):
        kind.to_device(weights, torch.float32, "cpu")
    _unchanged_by_range_ops(kind, weights)


def test_ia3_kind(root):
    kind = ADAPTER_TYPES["ia3"]
    assert kind is IA3Kind
    host = kind.read(root / "ia3", SPEC)
    assert isinstance(host, IA3Weights) and host.target_modules == ["down_proj", "k_proj",
                                                                     "v_proj"]
    assert _flags(kind) == (False, True, False)
    assert config_summary(root / "ia3", kind)[0] == 0
    assert kind.virtual_tokens(host) == 0 and kind.input_embeddings(host) is None
    w = kind.to_device(host, torch.float64, "cpu")
    assert isinstance(w, IA3Weights) and w.out_scale.keys() == host.out_scale.keys()
    assert all(v.dtype == torch.float64 for v in [*w.out_scale.values(),
                                                  *w.in_scale.values()])
    assert all(v.dtype == torch.float32 for v in host.out_scale.values())  # a copy

    # input scaling: down_proj's input only
    assert kind.input_scale(w, 1, "qkv") is None and kind.input_scale(w, 1, "o") is None
    assert torch.equal(kind.input_scale(w, 1, "down"), w.in_scale[(1, "down_proj")])
    # output scaling: the k and v columns of the given rows, nothing else
    out = torch.randn(6, QKV, dtype=torch.float64)
    before = out.clone()
    kind.linear(w, 1, "qkv", out, 2, 5, GROUPS["qkv"])
    q, kv = SPEC.q_size, SPEC.kv_size
    expect = before.clone()
    expect[2:5, q : q + kv] *= w.out_scale[(1, "k_proj")]
    expect[2:5, q + kv :] *= w.out_scale[(1, "v_proj")]
    assert torch.equal(out, expect) and not torch.equal(out, before)
    down = torch.randn(6, SPEC.hidden_size, dtype=torch.float64)
    before = down.clone()
    kind.linear(w, 1, "down", down, 0, 6, GROUPS["down"])  # scaled at its input only
    assert torch.equal(down, before)


def test_bottleneck_kind(root):
    kind = ADAPTER_TYPES["bottleneck"]
    assert kind is BottleneckKind and kind.config_file == "bottleneck_config.json"
    host = kind.read(root / "bottleneck", SPEC)
    assert isinstance(host, BottleneckWeights) and host.size == 16
    assert _flags(kind) == (False, True, False)
    assert config_summary(root / "bottleneck", kind)[0] == 0
    assert kind.virtual_tokens(host) == 0 and kind.input_embeddings(host) is None
    w = kind.to_device(host, torch.float32, "cpu")
    assert (w.activation, w.eps, w.size) == (host.activation, host.eps, host.size)
    assert all(kind.input_scale(w, 0, g) is None for g in GROUPS)

    for group, position in (("o", "attn"), ("down", "mlp")):
        out = torch.randn(5, SPEC.hidden_size)
        before = out.clone()
        kind.linear(w, 1, group, out, 1, 3, GROUPS[group])
        expect = before.clone()
        expect[1:3] += bottleneck_delta(before[1:3].clone(), w.layers[(1, position)],
                                        w.activation, w.eps)
        assert torch.equal(out, expect) and not torch.equal(out, before), group
    for group in ("qkv", "gate_up"):  # no adapter after these projections
        out = torch.randn(5, QKV if group == "qkv" else 2 * SPEC.intermediate_size)
        before = out.clone()
        kind.linear(w, 1, group, out, 0, 5, GROUPS[group])
        assert torch.equal(out, before)


@pytest.mark.parametrize("name,method,kind,n", [
    ("prompt", "prompt_tuning", PromptTuningKind, 5),
    ("ptuning", "p_tuning", PTuningKind, 4),
])
def test_soft_prompt_kinds(root, name, method, kind, n):
    assert ADAPTER_TYPES[method] is kind
    host = kind.read(root / name, SPEC)
    assert isinstance(host, PromptWeights)
    assert _flags(kind) == (False, False, False)
    assert kind.virtual_tokens(host) == n
    saved = load_file(root / name / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(kind.input_embeddings(host), saved.float())
    w = kind.to_device(host, torch.float64, "cpu")
    emb = kind.input_embeddings(w)
    assert emb.shape == (n, SPEC.hidden_size) and emb.dtype == torch.float64
    assert torch.equal(emb, saved.double())
    _unchanged_by_range_ops(kind, w)
    with pytest.raises(TypeError):
        kind.prefix_kv(w)


def test_prefix_tuning_kind(root):
    kind = ADAPTER_TYPES["prefix_tuning"]
    assert kind is PrefixTuningKind
    host = kind.read(root / "prefix", SPEC)
    assert isinstance(host, PrefixWeights)
    assert _flags(kind) == (False, False, True)  # its keys and values go into the cache
    assert kind.virtual_tokens(host) == 6 and kind.input_embeddings(host) is None
    w = kind.to_device(host, torch.float32, "cpu")
    keys, values = kind.prefix_kv(w)
    assert len(keys) == len(values) == SPEC.num_layers
    shape = (SPEC.num_kv_heads, 6, SPEC.head_dim)
    assert all(t.shape == shape for t in [*keys, *values])
    # PEFT's layout: [virtual tokens, layers * 2 (key, value), kv heads, head dim]
    saved = load_file(root / "prefix" / "adapter_model.safetensors")["prompt_embeddings"]
    saved = saved.float().view(6, SPEC.num_layers * 2, SPEC.num_kv_heads, SPEC.head_dim)
    for layer in range(SPEC.num_layers):
        assert torch.equal(keys[layer], saved[:, 2 * layer].permute(1, 0, 2))
        assert torch.equal(values[layer], saved[:, 2 * layer + 1].permute(1, 0, 2))
    _unchanged_by_range_ops(kind, w)


def test_read_adapter_reads_each_directory_with_its_kind(root):
    for name, cls in (("lora", LoraWeights), ("ia3", IA3Weights), ("prompt", PromptWeights),
                      ("ptuning", PromptWeights), ("prefix", PrefixWeights),
                      ("bottleneck", BottleneckWeights)):
        method, weights = read_adapter(root / name, SPEC)
        assert method == method_of(root / name) and isinstance(weights, cls), name


def _per_type_hooks(ranges, group_modules):
    """AdapterHooks' pre and linear as they were before the kinds: one loop per type."""
    position_of = {"o": "attn", "down": "mlp"}
    input_module = {"o": "o_proj", "down": "down_proj"}
    ia3 = [(s, e, w) for s, e, w in ranges if isinstance(w, IA3Weights)]
    bottleneck = [(s, e, w) for s, e, w in ranges if isinstance(w, BottleneckWeights)]

    def pre(layer, group, x):
        module = input_module.get(group)
        scaled = None
        for start, end, w in ia3:
            vec = w.in_scale.get((layer, module))
            if vec is not None:
                if scaled is None:
                    scaled = x.clone()
                scaled[start:end] *= vec
        return x if scaled is None else scaled

    def linear(layer, group, x, out):
        for start, end, w in ia3:
            for name, _, off, size in group_modules[group]:
                vec = w.out_scale.get((layer, name))
                if vec is not None:
                    out[start:end, off : off + size] *= vec
        position = position_of.get(group)
        if position is None:
            return
        for start, end, w in bottleneck:
            weights = w.layers.get((layer, position))
            if weights is not None:
                out[start:end] += bottleneck_delta(out[start:end], weights, w.activation, w.eps)

    return pre, linear


def test_hooks_over_kinds_equal_the_per_type_loops(root):
    ia3 = IA3Kind.to_device(IA3Kind.read(root / "ia3", SPEC), torch.float32, "cpu")
    bn = BottleneckKind.to_device(BottleneckKind.read(root / "bottleneck", SPEC),
                                  torch.float32, "cpu")
    # ranges as pack_step makes them: disjoint, types interleaved
    spans = [(0, 3, IA3Kind, ia3), (3, 4, BottleneckKind, bn), (6, 9, IA3Kind, ia3),
             (9, 12, BottleneckKind, bn)]
    hooks = AdapterHooks([], spans, GROUPS)
    pre, linear = _per_type_hooks([(s, e, w) for s, e, _, w in spans], GROUPS)
    widths = {"qkv": QKV, "o": SPEC.hidden_size, "gate_up": 2 * SPEC.intermediate_size,
              "down": SPEC.hidden_size}
    inputs = {"qkv": SPEC.hidden_size, "o": SPEC.q_size, "gate_up": SPEC.hidden_size,
              "down": SPEC.intermediate_size}
    torch.manual_seed(0)
    changed = 0
    for layer in range(SPEC.num_layers):
        for group in GROUPS:
            x = torch.randn(13, inputs[group])
            got_x, want_x = hooks.pre(layer, group, x), pre(layer, group, x)
            assert torch.equal(got_x, want_x), (layer, group)
            assert (got_x is x) == (want_x is x)  # a new tensor only where it scales
            out = torch.randn(13, widths[group])
            got, want = out.clone(), out.clone()
            hooks.linear(layer, group, got_x, got)
            linear(layer, group, want_x, want)
            assert torch.equal(got, want), (layer, group)
            assert torch.equal(got[4:6], out[4:6]) and torch.equal(got[12:], out[12:])
            changed += (not torch.equal(got, out)) + (got_x is not x)
    assert changed == 4 * SPEC.num_layers  # qkv, down input (IA3); o, down (bottleneck)
