"""Evaluation: loss and perplexity on a split, greedy generation and task metrics."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from trainer.data import IGNORE, Encoded, Example, collate, prompt_and_reference, stop_ids


def virtual_tokens(model: nn.Module) -> int:
    """How many virtual tokens a prompt/p-tuning model puts before the input (else 0)."""
    inner = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    config = getattr(inner, "peft_config", {}).get("default")
    if config is not None and str(config.peft_type) in ("PROMPT_TUNING", "P_TUNING",
                                                        "PeftType.PROMPT_TUNING",
                                                        "PeftType.P_TUNING"):
        return int(config.num_virtual_tokens)
    return 0


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over trained positions, and their count.

    The LM head (vocabulary-wide) runs only on the columns where some row is trained
    (`logits_to_keep`): with the loss on responses only, most prompt columns are skipped.
    Prompt/p-tuning put virtual tokens first, hence the offset on those column indices.
    """
    labels = batch["labels"][:, 1:]  # position t predicts token t+1
    cols = (labels != IGNORE).any(0).nonzero().squeeze(1)  # [k]
    offset = virtual_tokens(model)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                logits_to_keep=cols + offset)
    logits = out.logits  # [batch, k, vocab]
    labels = labels[:, cols]
    keep = labels != IGNORE
    loss = nn.functional.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")
    return loss, int(keep.sum())


@torch.no_grad()
def eval_loss(model: nn.Module, data: list[Encoded], pad_id: int, batch_size: int,
              device: str = "cpu") -> dict[str, float]:
    """Token-weighted mean loss over `data` and its perplexity."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        batch = {k: v.to(device) for k, v in collate(data[i:i + batch_size], pad_id).items()}
        s, n = loss_sum(model, batch)
        total += float(s)
        count += n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0))}


@torch.no_grad()
def generate_greedy(model: nn.Module, tokenizer: Any, prompts: list[list[int]], pad_id: int,
                    max_new_tokens: int, batch_size: int = 16, device: str = "cpu",
                    token_ids: list[list[int]] | None = None) -> list[str]:
    """Greedy completions (left-padded batches), decoded without special tokens. They end
    at the first stop token (`trainer.data.stop_ids`, the tokens a server stops on);
    `token_ids`, when given, receives each completion's ids up to and including it."""
    was_training = model.training
    model.eval()
    out: list[str] = []
    stops = list(stop_ids(tokenizer))
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        n = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for j, p in enumerate(chunk):
            ids[j, n - len(p):] = torch.tensor(p)
            mask[j, n - len(p):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad_id, eos_token_id=stops)
        for row in gen[:, n:].tolist():
            ends = [j for j, t in enumerate(row) if t in stops]
            row = row[:ends[0] + 1] if ends else row  # what follows is padding
            if token_ids is not None:
                token_ids.append(row)
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return out


# Han ideographs (with extension A, compatibility and the supplementary planes), kana, Hangul.
_CJK = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
                  "\U00020000-\U0002fa1f]")


def is_cjk(text: str) -> bool:
    """Whether `text` holds a CJK character: such a reference is scored per character."""
    return _CJK.search(text) is not None


class _Characters:
    """rouge-score tokenizer: every non-space character is a token (its default keeps only
    [a-z0-9] words, so Chinese text has no tokens at all and ROUGE-L is 0)."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text if not c.isspace()]


def task_metrics(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """Exact match (after stripping), corpus BLEU (sacrebleu), mean ROUGE-L F1 (rouge-score).

    The tokenization is chosen per example from its reference: a reference with CJK text is
    tokenized by sacrebleu's `zh` tokenizer for BLEU (each Han character a word) and scored
    over characters for ROUGE-L; any other by sacrebleu's default `13a` and rouge-score's
    word tokenizer. The corpus BLEU is one score over the examples each tokenized its way.
    `cjk_references` counts the examples scored the CJK way and `text_tokenization` says
    which ways were used.
    """
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

    preds = [p.strip() for p in predictions]
    refs = [r.strip() for r in references]
    em = sum(p == r for p, r in zip(preds, refs, strict=True)) / max(len(refs), 1)
    cjk = [is_cjk(r) for r in refs]
    zh, t13a = TokenizerZh(), Tokenizer13a()
    tok_preds = [(zh if c else t13a)(p) for p, c in zip(preds, cjk, strict=True)]
    tok_refs = [(zh if c else t13a)(r) for r, c in zip(refs, cjk, strict=True)]
    # effective order: short answers (a date, one word) have no 4-grams at all
    bleu = (BLEU(tokenize="none", effective_order=True).corpus_score(tok_preds, [tok_refs]).score
            if refs else 0.0)
    words = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    chars = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Characters())
    rouge = [(chars if c else words).score(r, p)["rougeL"].fmeasure
             for p, r, c in zip(preds, refs, cjk, strict=True)]
    n_cjk = sum(cjk)
    if n_cjk == 0:
        how = "bleu 13a, rouge_l words"
    elif n_cjk == len(refs):
        how = "bleu zh, rouge_l characters"
    else:
        how = (f"bleu zh and rouge_l characters for the {n_cjk} CJK references, "
               f"13a and words for the other {len(refs) - n_cjk}")
    return {"exact_match": em, "bleu": bleu, "rouge_l": sum(rouge) / max(len(rouge), 1),
            "cjk_references": n_cjk, "text_tokenization": how}


def generation_eval(model: nn.Module, tokenizer: Any, examples: list[Example], pad_id: int,
                    max_new_tokens: int, system_prompt: str | None = None,
                    device: str = "cpu", batch_size: int = 16) -> tuple[dict[str, Any], list]:
    """Task metrics on chat examples; returns (metrics, [(prompt ids, prediction, ref,
    prediction ids)])."""
    chats = [ex for ex in examples if "messages" in ex]
    if not chats:
        return {}, []
    pairs = [prompt_and_reference(tokenizer, ex, system_prompt) for ex in chats]
    prompts = [p for p, _ in pairs]
    refs = [r for _, r in pairs]
    ids: list[list[int]] = []
    preds = generate_greedy(model, tokenizer, prompts, pad_id, max_new_tokens,
                            batch_size=batch_size, device=device, token_ids=ids)
    return task_metrics(preds, refs), list(zip(prompts, preds, refs, ids, strict=True))
