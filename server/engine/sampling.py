"""Per-row next-token selection: greedy rows in one argmax, sampled rows with their own
seeded generator, following transformers' order (repetition penalty, temperature,
top-k, top-p) with OpenAI's presence and frequency penalties after the repetition penalty
(vLLM's order)."""

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


def apply_presence_frequency(logits: torch.Tensor, output: list[int], presence: float,
                             frequency: float) -> None:
    """In place on a [V] row, as OpenAI defines the two penalties:
    logit[t] -= frequency * count(t) + presence * (count(t) > 0), counted over `output`
    (the tokens generated so far, not the prompt)."""
    ids, counts = torch.unique(torch.tensor(output, dtype=torch.long), return_counts=True)
    ids = ids.to(logits.device)
    logits[ids] -= frequency * counts.to(logits.device, logits.dtype) + presence


def penalize(row: torch.Tensor, p: SamplingParams, history: list[int] | None,
             output: list[int] | None) -> None:
    """The penalties of `p`, in place on a [V] row: repetition (transformers' formula, over
    prompt and output), then frequency and presence (OpenAI's, over the output), in vLLM's
    order; all before temperature."""
    if p.repetition_penalty != 1.0 and history:
        apply_repetition_penalty(row, history, p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and output:
        apply_presence_frequency(row, output, p.presence_penalty, p.frequency_penalty)


def _top(lps: torch.Tensor, n: int) -> list[tuple[int, float]]:
    values, ids = lps.topk(min(n, lps.shape[-1]))
    return list(zip(ids.tolist(), values.tolist(), strict=True))


def select_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    histories: list[list[int] | None],
    generators: list[torch.Generator | None],
    want_logprobs: list[bool],
    outputs: list[list[int] | None] | None = None,
    top_logprobs: list[int] | None = None,
) -> tuple[list[int], list[float | None], list[list[tuple[int, float]] | None]]:
    """logits [R, V] (float) -> one token per row, its logprob where asked, and the
    row's `top_logprobs[i]` most likely (token id, logprob) where asked (best first).

    Logprobs are those of the distribution after the penalties and temperature (before
    top-k/top-p truncation); for greedy rows, after the penalties.
    """
    logits = logits.float()
    n_rows = len(params)
    outputs = outputs if outputs is not None else [None] * n_rows
    top_n = top_logprobs if top_logprobs is not None else [0] * n_rows
    tokens: list[int] = [0] * n_rows
    logprobs: list[float | None] = [None] * n_rows
    tops: list[list[tuple[int, float]] | None] = [None] * n_rows
    plain = [i for i, p in enumerate(params) if p.greedy and not p.penalized]
    if plain:
        idx = torch.tensor(plain)
        rows = logits[idx]
        best = rows.argmax(-1).tolist()
        need = [j for j, i in enumerate(plain) if want_logprobs[i] or top_n[i]]
        lps = None
        if need:
            lps = rows[need].log_softmax(-1)
        for j, i in enumerate(plain):
            tokens[i] = best[j]
        for k, j in enumerate(need):
            i = plain[j]
            if want_logprobs[i]:
                logprobs[i] = float(lps[k, best[j]])
            if top_n[i]:
                tops[i] = _top(lps[k], top_n[i])
    for i, p in enumerate(params):
        if p.greedy and not p.penalized:
            continue
        row = logits[i].clone()
        penalize(row, p, histories[i], outputs[i])
        if p.greedy:
            tok = int(row.argmax())
            scaled = row
        else:
            scaled = row / p.temperature
            filtered = filter_top_k_top_p(scaled, p.top_k, p.top_p)
            probs = filtered.softmax(-1)
            tok = int(torch.multinomial(probs, 1, generator=generators[i]))
        tokens[i] = tok
        if want_logprobs[i] or top_n[i]:
            lps_row = scaled.log_softmax(-1)
            if want_logprobs[i]:
                logprobs[i] = float(lps_row[tok])
            if top_n[i]:
                tops[i] = _top(lps_row, top_n[i])
    return tokens, logprobs, tops
