"""Data: JSONL in the common shapes -> conversations -> token ids with a loss mask.

Accepted shapes, one JSON object per line:
  {"prompt": ..., "completion": ...}            (also "response" for "completion")
  {"instruction": ..., "input": ..., "output": ...}   ("input" optional)
  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
  {"text": ...}                                 (plain text, trained on every token)
Everything but plain text becomes a chat rendered with the base model's chat template.
By default the loss covers only the assistant turns, each including its end-of-turn token
(EOS); the template tokens before a response are masked (label -100).
"""

from __future__ import annotations

import hashlib
import json
import random
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE = -100
ROLES = ("system", "user", "assistant")

Example = dict[str, Any]  # normalized: {"messages": [...]} or {"text": str}, plus "line"


class DataError(ValueError):
    """A data file cannot be used; the message names the file and line."""


def read_jsonl(path: str | Path) -> list[Example]:
    """Read and normalize a JSONL file; malformed lines raise DataError naming the line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} not found")
    out: list[Example] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
            ex = normalize_record(obj, where=f"{p}:{lineno}")
            ex["line"] = lineno
            out.append(ex)
    if not out:
        raise DataError(f"data file {str(p)!r} holds no examples")
    return out


def normalize_record(obj: Any, where: str = "record") -> Example:
    """One record in any accepted shape -> {"messages": [...]} or {"text": ...}."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")

    def text_field(key: str) -> str:
        v = obj.get(key, "")
        if v is None:
            return ""
        if not isinstance(v, str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
        return v

    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        norm = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: messages[{i}] needs 'role' and 'content'")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: messages[{i}].role {m['role']!r} is not one of "
                                f"{', '.join(ROLES)}")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: messages[{i}].content must be a string")
            norm.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in norm):
            raise DataError(f"{where}: 'messages' has no assistant turn to train on")
        return {"messages": norm}
    if "prompt" in obj and ("completion" in obj or "response" in obj):
        answer = text_field("completion" if "completion" in obj else "response")
        return {"messages": [{"role": "user", "content": text_field("prompt")},
                             {"role": "assistant", "content": answer}]}
    if "instruction" in obj and "output" in obj:
        user = text_field("instruction")
        extra = text_field("input")
        if extra.strip():
            user = f"{user}\n\n{extra}"
        return {"messages": [{"role": "user", "content": user},
                             {"role": "assistant", "content": text_field("output")}]}
    if "text" in obj:
        return {"text": text_field("text")}
    raise DataError(
        f"{where}: unknown record shape with keys {sorted(obj)}; expected prompt/completion, "
        "instruction/input/output, messages or text"
    )


def split_train_val(
    examples: list[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """A fixed-seed shuffle, then the last `val_fraction` goes to validation."""
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_val = int(round(len(examples) * val_fraction)) if val_fraction > 0 else 0
    if val_fraction > 0 and len(examples) > 1:
        n_val = max(1, n_val)
    val = [examples[i] for i in sorted(idx[len(idx) - n_val:])] if n_val else []
    train = [examples[i] for i in sorted(idx[: len(idx) - n_val])]
    return train, val


def fingerprint(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        body = {k: v for k, v in ex.items() if k != "line"}
        h.update(json.dumps(body, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


# --- tokenization ------------------------------------------------------------------------


def pick_pad_id(tokenizer: Any) -> int:
    """A pad id distinct from EOS; it is always masked, so any non-EOS token will do.

    Prefers an existing special token (the model's vocabulary must not change): the
    tokenizer's pad if it differs from EOS, then unk, `<|endoftext|>`, `<pad>`, then id 0.
    """
    eos = tokenizer.eos_token_id
    candidates = [tokenizer.pad_token_id, tokenizer.unk_token_id]
    for tok in ("<|endoftext|>", "<pad>", "<|pad|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            candidates.append(tid)
    candidates += [0, 1]
    for c in candidates:
        if c is not None and c != eos:
            return int(c)
    raise DataError("no pad token distinct from EOS is available")  # pragma: no cover


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


_STOP_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def stop_ids(tokenizer: Any) -> tuple[int, ...]:
    """The tokens a generation ends on (`server.model_store.stop_token_ids`, computed once
    per tokenizer): EOS, the chat template's end-of-turn token, the generation config's."""
    try:
        return _STOP_IDS[tokenizer]
    except (KeyError, TypeError):
        from server.model_store import stop_token_ids

        ids = stop_token_ids(tokenizer)
        try:
            _STOP_IDS[tokenizer] = ids
        except TypeError:  # not weak-referenceable: recomputed each time
            pass
        return ids


def encode_example(
    tokenizer: Any, ex: Example, train_on_prompt: bool = False, system_prompt: str | None = None
) -> Encoded:
    """Token ids and labels for one example; masked positions carry label -100.

    Chats are tokenized piece by piece (prompt part, then response part), which is exactly
    how a server tokenizes a prompt rendered with the generation prompt and then generates.
    Each assistant turn is trained up to and including its end: the first stop token
    (`stop_ids`: EOS or the template's end-of-turn token, as a server stops on them);
    template text after it (a newline) is masked.
    """
    eos = tokenizer.eos_token_id
    stops = set(stop_ids(tokenizer))
    if "text" in ex:
        ids = _ids(tokenizer, ex["text"]) + [eos]
        return Encoded(ids, list(ids))
    messages = with_system(ex["messages"], system_prompt)
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], generation_prompt=True)
        full = render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError("the chat template does not render conversations incrementally")
        p_ids = _ids(tokenizer, prompt[len(done):])
        r_ids = _ids(tokenizer, full[len(prompt):])
        ends = [j for j, t in enumerate(r_ids) if t in stops]
        if ends:
            cut = ends[0] + 1
            trained, tail = r_ids[:cut], r_ids[cut:]
        else:  # template without an end-of-turn token: EOS is still always trained
            trained, tail = r_ids + [eos], []
        ids += p_ids + trained + tail
        labels += (p_ids if train_on_prompt else [IGNORE] * len(p_ids)) + trained
        labels += [IGNORE] * len(tail)
        done = full
    return Encoded(ids, labels)


def prompt_and_reference(
    tokenizer: Any, ex: Example, system_prompt: str | None = None
) -> tuple[list[int], str]:
    """For generation metrics: the prompt ids up to the last assistant turn, and its text."""
    messages = with_system(ex["messages"], system_prompt)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = render(tokenizer, messages[:last], generation_prompt=True)
    return _ids(tokenizer, prompt), messages[last]["content"]


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded positions are masked and never trained."""
    n = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, e in enumerate(batch):
        k = len(e.input_ids)
        input_ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        mask[i, :k] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def preview(tokenizer: Any, enc: Encoded, max_tokens: int = 200) -> str:
    """A human-readable view of one example: trained tokens in [[...]], masked ones plain.

    Each run of tokens with the same mask is decoded as one span: a byte-level BPE splits a
    Chinese character (3 bytes in UTF-8) over several tokens, and decoding them one at a time
    prints U+FFFD for each piece. A span that would still end inside a character (a mask
    change in the middle of one) takes tokens from the next span until it decodes whole.
    """
    pairs = list(zip(enc.input_ids, enc.labels, strict=True))
    shown = pairs[:max_tokens]
    while len(shown) < len(pairs) and _cut_inside_char(tokenizer, [t for t, _ in shown]):
        shown.append(pairs[len(shown)])  # never cut a character at the end either
    spans: list[tuple[list[int], bool]] = []
    for tid, lab in shown:
        trained = lab != IGNORE
        if spans and spans[-1][1] == trained:
            spans[-1][0].append(tid)
        else:
            spans.append(([tid], trained))
    for i in range(len(spans) - 1):
        ids, nxt = spans[i][0], spans[i + 1][0]
        while len(nxt) > 1 and _cut_inside_char(tokenizer, ids):
            ids.append(nxt.pop(0))
    out = [f"[[{tokenizer.decode(ids)}]]" if trained else tokenizer.decode(ids)
           for ids, trained in spans if ids]
    more = "" if len(shown) == len(pairs) else f" ... (+{len(pairs) - len(shown)})"
    return "".join(out) + more


def _cut_inside_char(tokenizer: Any, ids: list[int]) -> bool:
    """Whether `ids` end inside a multi-byte character (the decoder then emits U+FFFD)."""
    return bool(ids) and tokenizer.decode(ids[-4:]).endswith("\ufffd")
