"""Device-resident LoRA slots and the per-row LoRA op.

Every resident adapter owns one slot of preallocated stacked tensors. The engine fuses
q/k/v and gate/up, so A is stacked per group with one block of `max_rank` columns per
module, and B per module:
    A[group]  [layers, slots, in_features, modules_in_group * max_rank]
    B[module] [layers, slots, max_rank, out_features]
Ranks below max_rank are zero-padded, so mixed ranks share one table.

What the op computes, for every token i whose row uses an adapter (slot[i] >= 0):

    y[i, cols(m)] += x[i] @ A[slot[i]][:, block(m)] @ B[m][slot[i]]     (scale folded in B)

Three ways, chosen per step by the engine:
  * native (CPU, fp32): segments of up to `native.MAX_ROWS` tokens (decode rows, short
    prefill chunks) go to the C kernel of `server.native`, one call per group for all.
  * segments (Punica's SGMV): tokens of one slot are contiguous; one small matmul chain
    per (segment, module). Best for prefill chunks and for few distinct adapters.
  * batched (BGMV over the whole table, when there is no native kernel): decode tokens
    gathered into [slots, L, in] (zero rows for padding), two bmm per module over all
    slots, scattered back with index_add. A fixed number of ops per layer.
`lora_reference` computes the same from PEFT's per-module tensors, token by token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from server import native
from server.adapters.lora import GROUPS, MODULES, AdapterError, LoraWeights, group_shapes
from server.engine.model import ModelSpec


# group -> [(module, index in group, output column offset, output size)]
def group_modules(spec: ModelSpec) -> dict[str, list[tuple[str, int, int, int]]]:
    shapes = group_shapes(spec)
    out: dict[str, list[tuple[str, int, int, int]]] = {g: [] for g in GROUPS}
    for module, (group, idx) in MODULES.items():
        sizes = shapes[group][1]
        out[group].append((module, idx, sum(sizes[:idx]), sizes[idx]))
    return out


_MODULE_BIT = {m: i for i, m in enumerate(MODULES)}
_GROUP_INDEX = {g: i for i, g in enumerate(GROUPS)}


class LoraSlotTable:
    def __init__(self, spec: ModelSpec, num_slots: int, max_rank: int, dtype, device,
                 kernel: native.Kernels | None = None) -> None:
        self.spec = spec
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.dtype = dtype  # bf16 tables may serve fp32 rows (the native kernel; BLAS widens)
        self.groups = group_modules(spec)
        shapes = group_shapes(spec)
        L, S, r = spec.num_layers, num_slots, max_rank
        self.A = {g: torch.zeros(L, S, shapes[g][0], len(self.groups[g]) * r, dtype=dtype,
                                 device=device) for g in GROUPS}
        self.B = {m: torch.zeros(L, S, r, size, dtype=dtype, device=device)
                  for g in GROUPS for m, _, _, size in self.groups[g]}
        # Per slot, a bit per (layer, module) that the adapter targets.
        self.targets: list[int] = [0] * num_slots
        # Per-layer views, made once: indexing costs dispatch time on every step.
        self.A_layers = {g: list(t.unbind(0)) for g, t in self.A.items()}
        self.B_layers = {m: list(t.unbind(0)) for m, t in self.B.items()}
        self._present: dict[tuple[int, int, str], list] = {}
        # The native kernel's view: per (slot, layer, group) the bits of the group's
        # modules the slot targets, and per (group, layer) a descriptor of the tables.
        self.kernel = kernel
        self.group_bits = np.zeros((S, L, len(GROUPS)), dtype=np.int64)
        self.native_desc = {g: [self._desc(g, layer) for layer in range(L)] for g in GROUPS}
        # their addresses, looked up once (numpy's .ctypes is microseconds a call)
        self.native_desc_ptr = {g: [d.ctypes.data for d in descs]
                                for g, descs in self.native_desc.items()}

    def _desc(self, group: str, layer: int) -> np.ndarray:
        A = self.A_layers[group][layer]
        # group_bits[0, layer, group]; the kernel strides by slot (the array is never
        # reallocated, so the address holds)
        bits = (self.group_bits.ctypes.data
                + (layer * len(GROUPS) + _GROUP_INDEX[group]) * self.group_bits.itemsize)
        desc = [A.shape[1], A.data_ptr(), A.shape[2], self.max_rank, len(self.groups[group]),
                bits, self.spec.num_layers * len(GROUPS)]
        for module, _, off, size in self.groups[group]:
            desc += [self.B_layers[module][layer].data_ptr(), off, size]
        return np.array(desc, dtype=np.int64)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.A.values(), *self.B.values()])

    def check_fits(self, weights: LoraWeights, adapter_id: str) -> None:
        if weights.rank > self.max_rank:
            raise AdapterError(f"adapter {adapter_id!r} rank {weights.rank} is greater than "
                               f"max rank {self.max_rank} (--max-lora-rank)")

    def write(self, slot: int, weights: LoraWeights) -> None:
        """Copy an adapter into a slot. Only the blocks the previous occupant used and the
        new one does not are zeroed: a slot write costs about the adapter's own size."""
        r_max = self.max_rank
        bits = 0
        for (layer, module), (a, b, scale) in weights.modules.items():
            group, idx = MODULES[module]
            r = a.shape[0]
            block = self.A[group][layer, slot, :, idx * r_max : (idx + 1) * r_max]
            block[:, :r].copy_(a.T)
            block[:, r:].zero_()
            rows = self.B[module][layer, slot]
            rows[:r].copy_(b.T * scale)  # scaled on the host, in its dtype; one copy over
            rows[r:].zero_()
            bits |= 1 << (layer * len(MODULES) + _MODULE_BIT[module])
        self._zero(slot, self.targets[slot] & ~bits)
        self._set_targets(slot, bits)

    def clear(self, slot: int) -> None:
        self._zero(slot, self.targets[slot])
        self._set_targets(slot, 0)

    def _set_targets(self, slot: int, bits: int) -> None:
        self.targets[slot] = bits
        self.group_bits[slot] = 0
        for layer in range(self.spec.num_layers):
            for module, (group, idx) in MODULES.items():
                if self.targeted(bits, layer, module):
                    self.group_bits[slot, layer, _GROUP_INDEX[group]] |= 1 << idx

    def _zero(self, slot: int, bits: int) -> None:
        r_max = self.max_rank
        for layer in range(self.spec.num_layers):
            for module, (group, idx) in MODULES.items():
                if self.targeted(bits, layer, module):
                    self.A[group][layer, slot, :, idx * r_max : (idx + 1) * r_max].zero_()
                    self.B[module][layer, slot].zero_()

    def targeted(self, bits: int, layer: int, module: str) -> bool:
        return bool(bits >> (layer * len(MODULES) + _MODULE_BIT[module]) & 1)

    def present(self, bits: int, layer: int, group: str) -> list[tuple]:
        """(module, index, column offset, size, B[module][layer]) of the group's modules
        set in `bits` (cached: a step asks for each (layer, group) once)."""
        key = (bits, layer, group)
        found = self._present.get(key)
        if found is None:
            if len(self._present) > 4096:
                self._present.clear()
            found = [(name, idx, off, size, self.B_layers[name][layer])
                     for name, idx, off, size in self.groups[group]
                     if self.targeted(bits, layer, name)]
            self._present[key] = found
        return found


@dataclass
class BatchedRows:
    """Decode tokens laid out [slots, L]: x_index into x with a zero row appended (pad ->
    len(x)), out_index into the output (pad -> 0; padded deltas are exactly zero)."""

    x_index: torch.Tensor
    out_index: torch.Tensor
    length: int  # L
    targets: int  # union of the active slots' target bits
    # (start, end) when the decode tokens are exactly tokens [start, end) in slot order,
    # L per slot for every slot of the table: views replace the gather and the scatter.
    contiguous: tuple[int, int] | None = None

    @classmethod
    def build(cls, table: LoraSlotTable, token_slots: Sequence[tuple[int, int]],
              num_tokens: int, device) -> BatchedRows:
        """token_slots: (token index, slot) of each decode token that uses an adapter."""
        per_slot: dict[int, list[int]] = {}
        for tok, slot in token_slots:
            per_slot.setdefault(slot, []).append(tok)
        length = max(len(v) for v in per_slot.values())
        x_index = [num_tokens] * (table.num_slots * length)
        out_index = [0] * (table.num_slots * length)
        targets = 0
        for slot, toks in per_slot.items():
            base = slot * length
            x_index[base : base + len(toks)] = toks
            out_index[base : base + len(toks)] = toks
            targets |= table.targets[slot]
        first = x_index[0]
        contiguous = None
        if x_index == list(range(first, first + len(x_index))) and first + len(
                x_index) <= num_tokens:
            contiguous = (first, first + len(x_index))
        return cls(torch.tensor(x_index, device=device), torch.tensor(out_index, device=device),
                   length, targets, contiguous)


class LoraHooks:
    """The model's adapter hook for one step. With the table's native kernel, segments of
    up to `native.MAX_ROWS` tokens go to it and longer ones to BLAS."""

    def __init__(self, table: LoraSlotTable, segments: Sequence[tuple[int, int, int]],
                 batched: BatchedRows | None = None) -> None:
        self.table = table
        self.batched = batched
        # for the kernel: (segments [n, 3] int64, their address, n, threads)
        self.native = None
        if table.kernel is not None:
            short = [s for s in segments if s[2] - s[1] <= native.MAX_ROWS]
            if short:
                segs = np.array(short, dtype=np.int64)
                self.native = (segs, segs.ctypes.data, len(segs), torch.get_num_threads())
            segments = [s for s in segments if s[2] - s[1] > native.MAX_ROWS]
        self.segments = segments  # (slot, start, end): tokens [start, end) use `slot`

    def linear(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        table, r = self.table, self.table.max_rank
        if self.native is not None:
            _, segs, nsegs, threads = self.native
            table.kernel.lora(x if x.stride(1) == 1 else x.contiguous(), out,
                              table.native_desc_ptr[group][layer], segs, nsegs, threads,
                              table.dtype)
        A = table.A_layers[group][layer]
        for slot, start, end in self.segments:
            present = table.present(table.targets[slot], layer, group)
            if not present:
                continue
            t = x[start:end] @ A[slot].to(x.dtype)
            for _, idx, off, size, B in present:
                out[start:end, off : off + size].addmm_(t[:, idx * r : (idx + 1) * r],
                                                        B[slot].to(x.dtype))
        b = self.batched
        if b is None:
            return
        present = table.present(b.targets, layer, group)
        if not present:
            return
        S, L = table.num_slots, b.length
        if b.contiguous is not None:
            start, end = b.contiguous
            xs = x[start:end].view(S, L, -1)
        else:
            xs = torch.cat([x, x.new_zeros(1, x.shape[1])])[b.x_index].view(S, L, -1)
        ts = torch.bmm(xs, A).split(r, dim=2)  # per module [S, L, r]
        for _, idx, off, size, B in present:
            d = torch.bmm(ts[idx], B).view(S * L, size)
            if b.contiguous is not None:
                out[start:end, off : off + size] += d
            else:
                out[:, off : off + size].index_add_(0, b.out_index, d)


def lora_reference(
    x: torch.Tensor,
    token_adapters: Sequence[LoraWeights | None],
    layer: int,
    group: str,
    spec: ModelSpec,
) -> torch.Tensor:
    """The delta to add to the group's output, token by token, from the PEFT tensors."""
    in_f, outs = group_shapes(spec)[group]
    delta = torch.zeros(x.shape[0], sum(outs), dtype=x.dtype)
    for i, weights in enumerate(token_adapters):
        if weights is None:
            continue
        for module, (grp, idx) in MODULES.items():
            entry = weights.modules.get((layer, module))
            if grp != group or entry is None:
                continue
            a, b, scale = entry
            a, b = a.to(x.dtype), b.to(x.dtype)
            start = sum(outs[:idx])
            delta[i, start : start + outs[idx]] += (x[i] @ a.T) @ b.T * scale
    return delta
