"""Cleaning: normalise text, redact personal data, drop empty, blocked and duplicate examples.

Every drop is recorded with its reason and source line in a `CleaningReport`, which the
trainer writes next to the artifact as `data_report.json`. Over-length examples are dropped
after tokenization (`drop_over_length`), since only then is their length known.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any

from textguard.detectors import DETECTORS, Blocklist
from textguard.detectors import redact as redact_pii_text
from trainer.data import Example

_MAX_LISTED = 1000


@dataclass
class CleaningReport:
    total: int = 0
    kept: int = 0
    redactions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DETECTORS, 0))
    dropped: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)  # first drops, with reasons

    def drop(self, ex: Example, reason: str, detail: str = "") -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if len(self.examples) < _MAX_LISTED:
            row = {"line": ex.get("line"), "reason": reason}
            if detail:
                row["detail"] = detail
            self.examples.append(row)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "kept": self.kept, "dropped": dict(self.dropped),
                "redactions": dict(self.redactions), "dropped_examples": self.examples}


def redact(text: str, counts: dict[str, int]) -> str:
    """Replace personal data by tags: e-mail addresses [EMAIL], mainland resident IDs
    (check digit verified) [ID], card numbers (Luhn-valid) [CARD], phone numbers
    (international, North American, mainland mobile and landline) [PHONE]. The detectors
    are the server's output-policy ones (textguard.detectors); `counts` is increased per
    detector name (email, cn_id, card, phone)."""
    return redact_pii_text(text, counts)


def normalize_text(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return text.strip()


def _contents(ex: Example) -> list[str]:
    return [ex["text"]] if "text" in ex else [m["content"] for m in ex["messages"]]


def _map_contents(ex: Example, fn) -> Example:
    if "text" in ex:
        return {**ex, "text": fn(ex["text"])}
    return {**ex, "messages": [{**m, "content": fn(m["content"])} for m in ex["messages"]]}


def _exact_key(ex: Example) -> str:
    if "text" in ex:
        return "t\x00" + ex["text"]
    return "\x00".join(f"{m['role']}\x01{m['content']}" for m in ex["messages"])


def _near_key(ex: Example) -> str:
    """Case, punctuation and whitespace removed: catches near-exact copies."""
    return "".join(ch for ch in _exact_key(ex).casefold() if ch.isalnum() or ch in "\x00\x01")


def clean(
    examples: list[Example],
    *,
    dedup: bool = True,
    near_dedup: bool = True,
    redact_pii: bool = False,
    blocklist: tuple[str, ...] = (),
    report: CleaningReport | None = None,
) -> tuple[list[Example], CleaningReport]:
    report = report or CleaningReport()
    report.total += len(examples)
    # whole words in space-delimited scripts, substrings in CJK (textguard.detectors)
    blocked = Blocklist(blocklist) if blocklist else None
    seen_exact: dict[str, Any] = {}
    seen_near: dict[str, Any] = {}
    kept: list[Example] = []
    for ex in examples:
        ex = _map_contents(ex, normalize_text)
        if redact_pii:
            ex = _map_contents(ex, lambda t: redact(t, report.redactions))
        contents = _contents(ex)
        if "text" in ex and not ex["text"]:
            report.drop(ex, "empty", "empty text")
            continue
        if "messages" in ex and any(not c for c in contents):
            report.drop(ex, "empty", "a message has empty content")
            continue
        if blocked is not None:
            hit = next((h for c in contents for h in [blocked.search(c)] if h), None)
            if hit:
                report.drop(ex, "blocklist", f"contains {hit!r}")
                continue
        key = _exact_key(ex)
        if dedup and key in seen_exact:
            report.drop(ex, "duplicate", f"same as line {seen_exact[key]}")
            continue
        near = _near_key(ex)
        if near_dedup and near in seen_near:
            report.drop(ex, "near_duplicate", f"near copy of line {seen_near[near]}")
            continue
        seen_exact[key] = ex.get("line")
        seen_near[near] = ex.get("line")
        kept.append(ex)
    report.kept = len(kept)
    return kept, report


def drop_over_length(
    examples: list[Example], lengths: list[int], max_len: int, report: CleaningReport
) -> list[int]:
    """Indices of examples that fit in `max_len` tokens; the others are reported."""
    keep = []
    for i, (ex, n) in enumerate(zip(examples, lengths, strict=True)):
        if n > max_len:
            report.drop(ex, "over_length", f"{n} tokens > max_seq_len {max_len}")
        else:
            keep.append(i)
    report.kept -= len(examples) - len(keep)
    return keep
