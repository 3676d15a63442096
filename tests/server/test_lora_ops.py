"""The fused per-row LoRA op against the plain per-token reference, and the slot table."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support import KERNEL_BUILDS, kernels_for, make_lora
from support import TINY_SPEC as SPEC

from server import native
from server.adapters.lora import GROUPS, MODULES, AdapterError, LoraWeights, group_shapes, read_lora
from server.adapters.slots import BatchedRows, LoraHooks, LoraSlotTable, lora_reference
from server.engine.model import ModelSpec


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    specs = [(4, ["q_proj", "v_proj"]), (16, ["k_proj", "o_proj", "down_proj"]),
             (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])]
    return [read_lora(make_lora(tiny_model, root / f"a{i}", r=r, targets=t, seed=i), SPEC)
            for i, (r, t) in enumerate(specs)]


def test_batched_op_on_views_when_rows_are_even(adapters):
    """Every slot with the same number of decode tokens, in slot order: no gather."""
    table = LoraSlotTable(SPEC, num_slots=3, max_rank=16, dtype=torch.float32, device="cpu")
    for slot, weights in enumerate(adapters):
        table.write(slot, weights)
    token_slots = [None, 0, 0, 1, 1, 2, 2]
    pairs = [(i, s) for i, s in enumerate(token_slots) if s is not None]
    rows = BatchedRows.build(table, pairs, len(token_slots), "cpu")
    assert rows.contiguous == (1, 7)
    hooks = LoraHooks(table, [], rows)
    x = torch.randn(len(token_slots), 64)
    out = torch.zeros(len(token_slots), 64 + 2 * 32)
    hooks.linear(1, "qkv", x, out)
    ref = lora_reference(x, [None if s is None else adapters[s] for s in token_slots], 1,
                         "qkv", SPEC)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["segments", "batched", "both", "native"])
def test_fast_op_matches_reference_for_mixed_rows(adapters, path):
    kernel = native.kernels() if path == "native" else None
    table = LoraSlotTable(SPEC, num_slots=4, max_rank=16, dtype=torch.float32, device="cpu",
                          kernel=kernel)
    for slot, weights in zip((2, 0, 3), adapters, strict=True):
        table.write(slot, weights)
    # Rows sorted by slot: base rows (no segment), then slots 0, 2, 3.
    token_slots = [None, None, 0, 0, 0, 2, 3, 3]
    by_slot = {2: adapters[0], 0: adapters[1], 3: adapters[2]}
    segments = [(0, 2, 5), (2, 5, 6), (3, 6, 8)]
    pairs = [(i, s) for i, s in enumerate(token_slots) if s is not None]
    if path in ("segments", "native"):
        hooks = LoraHooks(table, segments)
        assert (hooks.native is not None) == (path == "native") and not (
            path == "native" and hooks.segments)
    elif path == "batched":
        hooks = LoraHooks(table, [], BatchedRows.build(table, pairs, len(token_slots), "cpu"))
    else:  # a prefill segment for slot 0, the other tokens batched
        hooks = LoraHooks(table, segments[:1],
                          BatchedRows.build(table, pairs[3:], len(token_slots), "cpu"))
    torch.manual_seed(0)
    for layer in range(SPEC.num_layers):
        for group in GROUPS:
            in_f = {"qkv": 64, "o": 64, "gate_up": 64, "down": 128}[group]
            x = torch.randn(len(token_slots), in_f)
            out = torch.zeros(len(token_slots), lora_reference(x[:1], [None], 0, group,
                                                                 SPEC).shape[1])
            hooks.linear(layer, group, x, out)
            ref = lora_reference(x, [by_slot.get(s) if s is not None else None
                                     for s in token_slots], layer, group, SPEC)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            assert out[:2].abs().max() == 0  # base rows untouched


def _random_lora(spec: ModelSpec, rank: int, targets: list[str], seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    shapes = group_shapes(spec)
    modules = {}
    for layer in range(spec.num_layers):
        for name in targets:
            group, idx = MODULES[name]
            in_f, outs = shapes[group]
            modules[(layer, name)] = (torch.randn(rank, in_f, generator=g),
                                      torch.randn(outs[idx], rank, generator=g), 0.5)
    return LoraWeights(rank=rank, alpha=rank / 2, target_modules=targets, modules=modules)


# Sizes that are no multiple of a vector (16 or 8 floats): the kernel's scalar tails.
ODD_SPEC = ModelSpec(hidden_size=40, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=20,
                     intermediate_size=75, vocab_size=100, rms_norm_eps=1e-5,
                     max_positions=64, tie_word_embeddings=True, qkv_bias=False, o_bias=False,
                     mlp_bias=False)


def _bf16_exact(weights: LoraWeights) -> LoraWeights:
    """The same adapter with A and B rounded to bf16 (kept as fp32), so that a bf16 slot
    table holds exactly these values (the scale, 0.5, is a power of two)."""
    round_ = lambda t: t.bfloat16().float()  # noqa: E731
    return LoraWeights(rank=weights.rank, alpha=weights.alpha,
                       target_modules=weights.target_modules,
                       modules={k: (round_(a), round_(b), scale)
                                for k, (a, b, scale) in weights.modules.items()})


@pytest.mark.parametrize("march", KERNEL_BUILDS)
@pytest.mark.parametrize("spec,max_rank", [(SPEC, 64), (ODD_SPEC, 5), (ODD_SPEC, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("many", [False, True], ids=["by_chunk", "by_segment"])
def test_native_kernel_matches_reference_for_any_shape(spec, max_rank, march, dtype, many):
    """Short segments (the kernel) and one longer than native.MAX_ROWS (BLAS) in one step,
    ranks below the table's max rank, modules some adapters do not target; every build
    (AVX-512, AVX2, plain C) of the kernel; fp32 and bf16 slot tables (bf16: the delta is
    summed in fp32 and rounded once into the bf16 output, so the bound is one bf16 step).
    Both of the kernel's work splits at 2 threads: 3 short segments (by chunk) and 8, some
    of more than NR = 4 rows, some of slots that target nothing in a group (by segment,
    each thread prefetching its next segment's tables)."""
    table = LoraSlotTable(spec, num_slots=4, max_rank=max_rank, dtype=dtype,
                          device="cpu", kernel=kernels_for(march))
    all_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    by_slot = {3: _random_lora(spec, max_rank, all_modules, 1),
               1: _random_lora(spec, max(1, max_rank // 3), ["k_proj", "up_proj"], 2),
               0: _random_lora(spec, max_rank - 1, ["q_proj", "o_proj", "down_proj"], 3)}
    if dtype == torch.bfloat16:
        by_slot = {slot: _bf16_exact(w) for slot, w in by_slot.items()}
    for slot, weights in by_slot.items():
        table.write(slot, weights)
    long = native.MAX_ROWS + 3
    token_slots = [None, 0, 1, 1, 1, 1, 1, 3, 3]
    segments = [(0, 1, 2), (1, 2, 7), (3, 7, 9)]
    if many:
        token_slots += [1, 0, 0, 0, 0, 0, 3, 1]
        segments += [(1, 9, 10), (0, 10, 15), (3, 15, 16), (1, 16, 17)]
    n_short = len(token_slots)
    token_slots += [0] * long
    segments.append((0, n_short, n_short + long))
    hooks = LoraHooks(table, segments)
    assert hooks.segments == [segments[-1]] and len(hooks.native[0]) == len(segments) - 1
    hooks.native = (*hooks.native[:3], 2)  # two threads: len(segments) - 1 >= 4 by segment
    shapes = {g: (in_f, sum(outs)) for g, (in_f, outs) in group_shapes(spec).items()}
    torch.manual_seed(0)
    for layer in range(spec.num_layers):
        for group in GROUPS:
            in_f, out_f = shapes[group]
            x = torch.randn(len(token_slots), in_f).to(dtype)
            base = torch.randn(len(token_slots), out_f).to(dtype)
            out = base.clone()
            hooks.linear(layer, group, x, out)
            ref = lora_reference(x.float(), [by_slot.get(s) if s is not None else None
                                             for s in token_slots], layer, group, spec)
            if dtype == torch.float32:
                torch.testing.assert_close(out, base + ref, atol=1e-4, rtol=1e-4)
            else:  # the long segment (BLAS in bf16) rounds on the way: bf16's tolerance
                exact = (base.float() + ref).to(dtype)
                torch.testing.assert_close(out[:n_short], exact[:n_short], atol=1e-2,
                                           rtol=8e-3)
                torch.testing.assert_close(out.float(), base.float() + ref, atol=0.5,
                                           rtol=0.03)
            assert torch.equal(out[0], base[0])  # the base row is untouched


@pytest.mark.parametrize("march", KERNEL_BUILDS)
def test_bf16_tables_under_fp32_rows_equal_fp32_tables_of_the_rounded_weights(march):
    """--adapter-dtype bfloat16 under fp32 activations (the default over bf16 weights): the
    kernel widens the bf16 tables in registers and sums in fp32 in the fp32 kernel's order,
    and a segment longer than native.MAX_ROWS goes to BLAS on the widened slot; so the
    result is bit for bit that of fp32 tables holding the bf16-rounded weights, on every
    build. A long fp32 table against a bf16 row is refused."""
    all_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    by_slot = {2: _bf16_exact(_random_lora(ODD_SPEC, 24, all_modules, 1)),
               0: _bf16_exact(_random_lora(ODD_SPEC, 7, ["q_proj", "down_proj"], 2))}
    tables = {}
    for dtype in (torch.float32, torch.bfloat16):
        tables[dtype] = LoraSlotTable(ODD_SPEC, num_slots=3, max_rank=24, dtype=dtype,
                                      device="cpu", kernel=kernels_for(march))
        for slot, weights in by_slot.items():
            tables[dtype].write(slot, weights)
    long = native.MAX_ROWS + 2
    segments = [(0, 1, 3), (2, 3, 8), (2, 8, 8 + long)]
    torch.manual_seed(0)
    for layer in range(ODD_SPEC.num_layers):
        for group, (in_f, outs) in group_shapes(ODD_SPEC).items():
            x = torch.randn(8 + long, in_f)
            base = torch.randn(8 + long, sum(outs))
            got = {}
            for dtype, table in tables.items():
                got[dtype] = base.clone()
                LoraHooks(table, segments).linear(layer, group, x, got[dtype])
            assert torch.equal(got[torch.float32], got[torch.bfloat16]), (layer, group)
            assert not torch.equal(got[torch.float32][1:], base[1:])  # the adapters did add
    with pytest.raises(ValueError, match="float32 tables take float32 rows only"):
        LoraHooks(tables[torch.float32], [(0, 0, 2)]).linear(
            0, "qkv", torch.zeros(2, ODD_SPEC.hidden_size, dtype=torch.bfloat16),
            torch.zeros(2, 8, dtype=torch.bfloat16))


def test_native_rows_are_the_same_alone_and_in_any_mix(adapters):
    """A row's delta does not depend on the other rows of its step, bit for bit."""
    table = LoraSlotTable(SPEC, num_slots=3, max_rank=16, dtype=torch.float32, device="cpu",
                          kernel=native.kernels())
    for slot, weights in enumerate(adapters):
        table.write(slot, weights)
    torch.manual_seed(0)
    x = torch.randn(7, 64)
    mixed = torch.zeros(7, 128)
    LoraHooks(table, [(0, 0, 3), (1, 3, 4), (2, 4, 7)]).linear(1, "qkv", x, mixed)
    for row, slot in enumerate([0, 0, 0, 1, 2, 2, 2]):
        alone = torch.zeros(1, 128)
        LoraHooks(table, [(slot, 0, 1)]).linear(1, "qkv", x[row : row + 1], alone)
        assert torch.equal(alone[0], mixed[row])


def test_kernel_refuses_tensors_it_cannot_read():
    table = LoraSlotTable(SPEC, num_slots=1, max_rank=4, dtype=torch.float32, device="cpu",
                          kernel=native.kernels())
    hooks = LoraHooks(table, [(0, 0, 2)])
    with pytest.raises(ValueError, match="unit column stride"):
        hooks.linear(0, "qkv", torch.randn(2, 64), torch.zeros(128, 2).T)


def test_without_a_compiler_auto_falls_back_and_native_is_an_error(monkeypatch, tmp_path,
                                                                    caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("SWITCHBOARD_CACHE", str(tmp_path / "cache"))
    native.kernels.cache_clear()
    try:
        with pytest.raises(native.NativeError, match="does not run"):
            native.build()
        cpu = torch.device("cpu")
        assert native.pick("auto", cpu, torch.float32) is None
        assert "the engine uses PyTorch ops only" in caplog.text
        with pytest.raises(native.NativeError, match="does not run"):
            native.pick("native", cpu, torch.float32)
        assert native.pick("torch", cpu, torch.float32) is None
        with pytest.raises(native.NativeError, match="float32"):
            native.pick("native", cpu, torch.bfloat16)
        monkeypatch.setenv("CC", "false")  # runs, but builds nothing
        with pytest.raises(native.NativeError, match="could not build"):
            native.build()
    finally:
        native.kernels.cache_clear()
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))


def test_build_is_cached_per_cpu_and_source(tmp_path):
    first = native.build(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [first.name]


def test_slot_clear_and_overwrite(adapters):
    table = LoraSlotTable(SPEC, num_slots=1, max_rank=16, dtype=torch.float32, device="cpu")
    table.write(0, adapters[1])  # k, o, down at rank 16
    assert table.targeted(table.targets[0], 1, "o_proj")
    assert table.B["o_proj"][1, 0].abs().sum() > 0
    table.write(0, adapters[0])  # q and v at rank 4; nothing on o any more
    bits = table.targets[0]
    assert table.targeted(bits, 0, "q_proj") and not table.targeted(bits, 0, "o_proj")
    assert table.B["o_proj"][:, 0].abs().sum() == 0
    assert table.A["qkv"][0, 0, :, 4:16].abs().sum() == 0  # rank 4 is zero-padded to 16
    assert table.group_bits[0, :, GROUPS.index("qkv")].tolist() == [0b101] * SPEC.num_layers
    assert not table.group_bits[0, :, 1:].any()  # the kernel skips o, gate_up, down
    table.clear(0)
    assert table.targets[0] == 0 and all(t[:, 0].abs().sum() == 0 for t in table.B.values())
    assert not table.group_bits[0].any()


def test_rank_limit_reports_both_numbers(adapters):
    table = LoraSlotTable(SPEC, num_slots=1, max_rank=8, dtype=torch.float32, device="cpu")
    with pytest.raises(AdapterError, match="rank 16 is greater than max rank 8"):
        table.check_fits(adapters[1], "a1")


def test_adapter_for_another_base_is_refused(tiny_model, tmp_path):
    path = make_lora(tiny_model, tmp_path / "a", r=4, targets=["q_proj"], seed=1)
    other = dataclasses.replace(SPEC, hidden_size=96)
    with pytest.raises(AdapterError, match="trained for a different base"):
        read_lora(path, other)


def test_pickled_weights_refused_unless_allowed(tiny_model, tmp_path):
    from safetensors.torch import load_file

    path = make_lora(tiny_model, tmp_path / "a", r=4, targets=["q_proj"], seed=1)
    st = path / "adapter_model.safetensors"
    torch.save(load_file(st), path / "adapter_model.bin")
    st.unlink()
    with pytest.raises(AdapterError, match="pickled weights are refused"):
        read_lora(path, SPEC)
    assert read_lora(path, SPEC, allow_pickle=True).rank == 4


def test_non_finite_weights_refused(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_lora(tiny_model, tmp_path / "a", r=4, targets=["q_proj"], seed=1)
    st = path / "adapter_model.safetensors"
    tensors = load_file(st)
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, st)
    with pytest.raises(AdapterError, match="contains NaN or Inf"):
        read_lora(path, SPEC)
