"""The fused per-row LoRA op against the plain per-token reference, and the slot table."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support import TINY_SPEC as SPEC
from support import make_lora

from server.adapters.lora import GROUPS, AdapterError, read_lora
from server.adapters.slots import BatchedRows, LoraHooks, LoraSlotTable, lora_reference


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


@pytest.mark.parametrize("path", ["segments", "batched", "both"])
def test_fast_op_matches_reference_for_mixed_rows(adapters, path):
    table = LoraSlotTable(SPEC, num_slots=4, max_rank=16, dtype=torch.float32, device="cpu")
    for slot, weights in zip((2, 0, 3), adapters, strict=True):
        table.write(slot, weights)
    # Rows sorted by slot: base rows (no segment), then slots 0, 2, 3.
    token_slots = [None, None, 0, 0, 0, 2, 3, 3]
    by_slot = {2: adapters[0], 0: adapters[1], 3: adapters[2]}
    segments = [(0, 2, 5), (2, 5, 6), (3, 6, 8)]
    pairs = [(i, s) for i, s in enumerate(token_slots) if s is not None]
    if path == "segments":
        hooks = LoraHooks(table, segments)
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
    table.clear(0)
    assert table.targets[0] == 0 and all(t[:, 0].abs().sum() == 0 for t in table.B.values())


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
