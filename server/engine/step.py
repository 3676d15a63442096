"""Packing one step: scheduler entries -> the model's StepInputs and adapter hooks.

Decode tokens come first, then prefill chunks, each ordered by adapter slot (base model
first). So every adapter's tokens are contiguous (one LoRA segment, one IA3/bottleneck
range), and when every slot has the same number of decode rows the batched LoRA op
works on views of the activations instead of gathering them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.adapters.formats import BottleneckWeights, IA3Weights
from server.adapters.hooks import AdapterHooks
from server.adapters.slots import BatchedRows, LoraHooks, LoraSlotTable
from server.engine.model import StepInputs
from server.scheduler.scheduler import Entry


@dataclass
class PackedStep:
    inputs: StepInputs
    hooks: AdapterHooks | None
    sampled: list[Entry]  # entries whose next token this step yields, in logits order
    num_tokens: int


def pack_step(entries: list[Entry], table: LoraSlotTable, device,
              rope_long_from: int = 0) -> PackedStep:
    """`entries[i].seq.payload` is the engine's request state (slot, entry, virtual);
    rope_long_from: ModelSpec.rope_long_from (longrope), 0 otherwise."""
    entries = sorted(entries, key=lambda e: (e.n != 1, _slot(e)))
    batched_decode = _batch_decode(entries, table)
    ids, pos, rows, rope_long = [], [], [], []
    dec_tok, dec_rows, dec_lens, prefill, sample_idx, sampled = [], [], [], [], [], []
    overrides: list[tuple[int, torch.Tensor]] = []  # (token index, virtual token embedding)
    segments: list[list[int]] = []  # [slot, start, end] LoRA rows on the segment path
    decode_slots: list[tuple[int, int]] = []  # (token index, slot) on the batched path
    ranges: list[list] = []  # [start, end, device weights] of IA3 / bottleneck rows
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
        weights = state.entry.device_weights if state.entry is not None else None
        if weights is not None and hasattr(weights, "embeddings"):  # soft prompt
            for p in range(e.start, min(e.start + e.n, state.virtual)):
                overrides.append((start + p - e.start, weights.embeddings[p]))
        if isinstance(weights, IA3Weights | BottleneckWeights):
            if ranges and ranges[-1][2] is weights and ranges[-1][1] == start:
                ranges[-1][1] = start + e.n
            else:
                ranges.append([start, start + e.n, weights])
        elif state.slot is not None and weights is None:  # a LoRA row
            if e.n == 1 and batched_decode:
                decode_slots.append((start, state.slot))
            elif segments and segments[-1][0] == state.slot and segments[-1][2] == start:
                segments[-1][2] = start + e.n
            else:
                segments.append([state.slot, start, start + e.n])

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
    if segments or decode_slots or ranges:
        lora = None
        if segments or decode_slots:
            batched = (BatchedRows.build(table, decode_slots, len(ids), device)
                       if decode_slots else None)
            lora = LoraHooks(table, [tuple(s) for s in segments], batched)
        hooks = AdapterHooks(lora, [tuple(r) for r in ranges], table.groups)
    return PackedStep(inputs, hooks, sampled, len(ids))


def _slot(e: Entry) -> int:
    slot = e.seq.payload.slot
    return -1 if slot is None else slot


def _batch_decode(entries: list[Entry], table: LoraSlotTable) -> bool:
    """Batched LoRA over the whole slot table reads every slot's weights: worth it when at
    least half of the slots have decode rows in this step (and there is no native kernel,
    which reads just the slots in use)."""
    if table.kernel is not None:
        return False
    slots = {e.seq.payload.slot for e in entries
             if e.n == 1 and e.seq.payload.entry is not None
             and e.seq.payload.entry.device_weights is None} - {None}
    return len(slots) >= 2 and 2 * len(slots) >= table.num_slots
