"""Per-row next-token selection: greedy rows in one argmax, sampled rows with their own
seeded generator, following transformers' order (repetition penalty, temperature,
top-k, top-p)."""

from __future__ import annotations

import torch

from server.engine.types import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, history: list[int], penalty: float) -> None:
    """In place on a [V] row, as transformers' RepetitionPenaltyLogitsProcessor."""
    ids = torch.tensor(history, dtype=torch.long, device=logits.device)
    score = logits.gather(0, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    logits.scatter_(0, ids, score)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """[V] -> [V] with filtered-out entries at -inf (at least one token always kept)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[-1] = False
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return logits


def select_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    histories: list[list[int] | None],
    generators: list[torch.Generator | None],
    want_logprobs: list[bool],
) -> tuple[list[int], list[float | None]]:
    """logits [R, V] (float) -> one token per row, and its logprob where asked.

    The logprob is that of the chosen token under the distribution after repetition
    penalty and temperature (before top-k/top-p truncation).
    """
    logits = logits.float()
    tokens: list[int] = [0] * len(params)
    logprobs: list[float | None] = [None] * len(params)
    plain = [i for i, p in enumerate(params) if p.greedy and p.repetition_penalty == 1.0]
    if plain:
        idx = torch.tensor(plain)
        rows = logits[idx]
        best = rows.argmax(-1).tolist()
        need = [j for j, i in enumerate(plain) if want_logprobs[i]]
        lps = None
        if need:
            lps = rows[need].log_softmax(-1)
        for j, i in enumerate(plain):
            tokens[i] = best[j]
        for k, j in enumerate(need):
            logprobs[plain[j]] = float(lps[k, best[j]])
    for i, p in enumerate(params):
        if p.greedy and p.repetition_penalty == 1.0:
            continue
        row = logits[i].clone()
        if p.repetition_penalty != 1.0 and histories[i]:
            apply_repetition_penalty(row, histories[i], p.repetition_penalty)
        if p.greedy:
            tok = int(row.argmax())
            scaled = row
        else:
            scaled = row / p.temperature
            filtered = filter_top_k_top_p(scaled, p.top_k, p.top_p)
            probs = filtered.softmax(-1)
            tok = int(torch.multinomial(probs, 1, generator=generators[i]))
        tokens[i] = tok
        if want_logprobs[i]:
            logprobs[i] = float(scaled.log_softmax(-1)[tok])
    return tokens, logprobs
