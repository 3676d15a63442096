"""Packing one step: scheduler entries -> the model's StepInputs and adapter hooks.

Decode tokens come first, then prefill chunks, each ordered by adapter slot (base model
first). So every adapter's tokens are contiguous (one LoRA segment, one range of a kind
with range_ops: IA3, bottleneck), the rows of each LoRA rank bucket come together (slots
are numbered bucket after bucket), and when every slot of a bucket has the same number
of decode rows the batched LoRA op works on views of the activations instead of
gathering them. Each bucket in use gets its own `LoraHooks` over its table, with the
slots' indices inside that table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.adapters.hooks import AdapterHooks
from server.adapters.slot_buckets import SlotBuckets
from server.adapters.slots import BatchedRows, LoraHooks, LoraSlotTable
from server.engine.model import StepInputs
from server.scheduler.scheduler import Entry


@dataclass
class PackedStep:
    inputs: StepInputs
    hooks: AdapterHooks | None
    sampled: list[Entry]  # entries whose next token this step yields, in logits order
    num_tokens: int


def pack_step(entries: list[Entry], slots: SlotBuckets, device,
              rope_long_from: int = 0) -> PackedStep:
    """`entries[i].seq.payload` is the engine's request state (slot, entry, virtual);
    rope_long_from: ModelSpec.rope_long_from (longrope), 0 otherwise."""
    entries = sorted(entries, key=lambda e: (e.n != 1, _slot(e)))
    batched_decode = _batch_decode(entries, slots)
    ids, pos, rows, rope_long = [], [], [], []
    dec_tok, dec_rows, dec_lens, prefill, sample_idx, sampled = [], [], [], [], [], []
    overrides: list[tuple[int, torch.Tensor]] = []  # (token index, virtual token embedding)
    # per LoRA table: [slot, start, end] rows on the segment path and (token index, slot)
    # on the batched path, slots as indices in that table
    lora: dict[int, tuple[LoraSlotTable, list[list[int]], list[tuple[int, int]]]] = {}
    ranges: list[list] = []  # [start, end, kind, device weights] of range_ops kinds' rows
    for e in entries:
        seq, start, state = e.seq, len(ids), e.seq.payload
        ids.extend(seq.token_at(i) for i in range(e.start, e.start + e.n))
        pos.extend(range(e.start, e.start + e.n))
        rows.extend([seq.row] * e.n)
        if rope_long_from and len(seq.prompt_ids) > rope_long_from:
            # prompt tokens: transformers prefills the whole prompt in one forward
            rope_long.extend(range(start, start + min(e.n, len(seq.prompt_ids) - e.start)))
        if e.n == 1:
            dec_tok.append(start)
            dec_rows.append(seq.row)
            dec_lens.append(e.start + 1)
        else:
            prefill.append((start, start + e.n, seq.row, e.start))
        if e.samples:
            sample_idx.append(start + e.n - 1)
            sampled.append(e)
        kind = state.entry.kind if state.entry is not None else None
        weights = state.entry.device_weights if state.entry is not None else None
        embeddings = kind.input_embeddings(weights) if weights is not None else None
        if embeddings is not None:  # soft prompt
            for p in range(e.start, min(e.start + e.n, state.virtual)):
                overrides.append((start + p - e.start, embeddings[p]))
        if weights is not None and kind.range_ops:
            if ranges and ranges[-1][3] is weights and ranges[-1][1] == start:
                ranges[-1][1] = start + e.n
            else:
                ranges.append([start, start + e.n, kind, weights])
        elif state.slot is not None and kind is not None and kind.uses_lora_slot:  # LoRA
            table, slot = slots.locate(state.slot)
            _, segments, decode_slots = lora.setdefault(id(table), (table, [], []))
            if e.n == 1 and id(table) in batched_decode:
                decode_slots.append((start, slot))
            elif segments and segments[-1][0] == slot and segments[-1][2] == start:
                segments[-1][2] = start + e.n
            else:
                segments.append([slot, start, start + e.n])

    def tensor(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    inputs = StepInputs(
        input_ids=tensor(ids), positions=tensor(pos), rows=tensor(rows),
        decode_tok=tensor(dec_tok), decode_rows=tensor(dec_rows),
        decode_lens=tensor(dec_lens), prefill=prefill, sample_idx=tensor(sample_idx),
        decode_n_rows=max(dec_rows) + 1 if dec_rows else 0,
        decode_kv_len=max(dec_lens) if dec_lens else 0,
        embed_override=(tensor([i for i, _ in overrides]),
                        torch.stack([v for _, v in overrides])) if overrides else None,
        rope_long=tensor(rope_long) if rope_long else None,
    )
    hooks = None
    if lora or ranges:
        lora_hooks = [
            LoraHooks(table, [tuple(s) for s in segments],
                      BatchedRows.build(table, decode_slots, len(ids), device)
                      if decode_slots else None)
            for table, segments, decode_slots in lora.values()]
        hooks = AdapterHooks(lora_hooks, [tuple(r) for r in ranges], slots.groups)
    return PackedStep(inputs, hooks, sampled, len(ids))


def _slot(e: Entry) -> int:
    slot = e.seq.payload.slot
    return -1 if slot is None else slot


def _batch_decode(entries: list[Entry], slots: SlotBuckets) -> set[int]:
    """The tables (ids) whose decode rows take the batched op. Batched LoRA over a whole
    slot table reads every slot's weights: worth it when at least half of the table's
    slots have decode rows in this step (and there is no native kernel, which reads just
    the slots in use)."""
    if slots.kernel is not None:
        return set()
    used: dict[int, tuple[LoraSlotTable, set[int]]] = {}
    for e in entries:
        state = e.seq.payload
        if (e.n == 1 and state.slot is not None and state.entry is not None
                and state.entry.kind.uses_lora_slot):
            table, slot = slots.locate(state.slot)
            used.setdefault(id(table), (table, set()))[1].add(slot)
    return {key for key, (table, s) in used.items()
            if len(s) >= 2 and 2 * len(s) >= table.num_slots}
