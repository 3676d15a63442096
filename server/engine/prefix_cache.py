"""Automatic prefix caching: the keys and values of prompt blocks computed once, reused by
later requests whose prompts start with the same tokens under the same adapter.

A prompt is cut into blocks of BLOCK tokens; block j is named by a digest chained over the
adapter (its id and version: a replaced adapter starts a new chain) and the tokens of blocks
0..j, so a name stands for the whole prefix up to its block (as vLLM's block hashes do). A
request's prefill stores its prompt's full blocks (copied out of its KV-cache row); a new
request copies the longest run of cached blocks into its row and computes only the rest of
its prompt, at least its last token (whose logits give the first sample). The store holds
copies, never rows, so a cached prefix outlives the request that made it and costs the
running requests no row; it is bounded in bytes and evicts the least recently used blocks,
the chain's later blocks before its earlier ones.

What makes a prefix's keys and values differ besides its tokens must be in the chain's root:
the adapter (LoRA on k/v, IA3, a bottleneck before the next layer's k/v). Requests whose rows
hold virtual tokens (prompt, prefix and P-tuning adapters) are not cached, nor any request of
a model whose RoPE depends on the sequence's length (longrope: a prompt past
`rope_long_from` is computed with the long factors at every position). The engine thread
alone uses it."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from server.engine.model import KVCache

BLOCK = 16  # tokens a block


class PrefixCache:
    def __init__(self, kv: KVCache, budget_bytes: int, bytes_per_token: int,
                 block: int = BLOCK) -> None:
        self.kv = kv
        self.block = block
        self.block_bytes = bytes_per_token * block
        self.capacity = budget_bytes // self.block_bytes  # blocks
        # digest -> (keys [layers, kv_heads, block, dim], values), least recently used first
        self._blocks: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @property
    def nbytes(self) -> int:
        return len(self._blocks) * self.block_bytes

    def __len__(self) -> int:
        return len(self._blocks)

    def digests(self, root: str, tokens: list[int]) -> list[bytes]:
        """The chained names of the full blocks of `tokens` under `root`."""
        out, prev = [], hashlib.blake2b(root.encode(), digest_size=16).digest()
        for start in range(0, len(tokens) - self.block + 1, self.block):
            chunk = array("q", tokens[start : start + self.block]).tobytes()
            prev = hashlib.blake2b(prev + chunk, digest_size=16).digest()
            out.append(prev)
        return out

    def match(self, digests: list[bytes], prompt_len: int) -> list[tuple[torch.Tensor,
                                                                       torch.Tensor]]:
        """The cached blocks of the longest cached prefix of `digests`, leaving at least the
        prompt's last token to compute; marked as just used (the first block last, so that
        the chain's later blocks are evicted before its earlier ones)."""
        limit = min(len(digests), (prompt_len - 1) // self.block)
        found = []
        for d in digests[:limit]:
            if d not in self._blocks:
                break
            found.append(d)
        self._touch(found)
        return [self._blocks[d] for d in found]

    def load(self, blocks: list[tuple[torch.Tensor, torch.Tensor]], row: int) -> None:
        """Write matched blocks into positions [0, len(blocks) * block) of `row`."""
        if not blocks:
            return
        self.kv.write_prefix(row, torch.cat([k for k, _ in blocks], dim=2),  # [layers, ...]
                             torch.cat([v for _, v in blocks], dim=2))

    def store(self, digests: list[bytes], first: int, row: int) -> int:
        """Copy blocks first.. of `digests` (their tokens already in `row`'s cache) into the
        store; those already there are marked as used. Returns how many were added."""
        chain = digests[first:]
        self._touch(chain)  # before evicting for the new ones
        new = [j for j in range(first, len(digests)) if digests[j] not in self._blocks]
        new = new[: self.capacity]
        if not new:
            return 0
        lo, hi = new[0] * self.block, (new[-1] + 1) * self.block
        keys = torch.stack([kc[row, :, lo:hi] for kc in self.kv.k])  # [layers, kv, n, dim]
        values = torch.stack([vc[row, :, lo:hi] for vc in self.kv.v])
        for j in new:
            while len(self._blocks) >= self.capacity:
                self._blocks.popitem(last=False)
            s = j * self.block - lo
            self._blocks[digests[j]] = (keys[:, :, s : s + self.block].clone(),
                                        values[:, :, s : s + self.block].clone())
        self._touch(chain)
        return len(new)

    def _touch(self, chain: list[bytes]) -> None:
        """Mark a chain's cached blocks as just used, its first block last (the most
        recent), so that eviction takes a chain from its end."""
        for d in reversed(chain):
            if d in self._blocks:
                self._blocks.move_to_end(d)
