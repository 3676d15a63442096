"""A policy applied to text that arrives in pieces (a response streamed token by token).

`push(delta, item)` adds the next piece of final text and returns what can be released
now: text in which every match is already replaced, and the items (token ids with their
logprobs, for the server) whose text is released. Text is held back only from the first
place where a match could still be in progress: a partial match that reaches the end of
the text, or a complete match that more text could still extend or invalidate (the
`regex` module's partial matching decides both). A rule's hold-back is capped by its
longest possible match (`Matcher.max_chars`): a pattern without a bound uses its rule's
`max_chars` (default 256), and a match longer than that can be released in part.

Items follow their text: an item is released once all the text it produced is released,
and dropped when that text overlaps a replaced match or lies after a `stop` match.
`finish()` ends the text: what was held is decided and released.

Where matches overlap, the leftmost wins; at the same place a `stop` rule wins (so a stop
is decided as soon as its match is certain), then the longest, then the earlier rule.

Everything here is decided from the text alone, so a response read whole and the same
response streamed give the same text.
"""

from __future__ import annotations

from collections import deque
from typing import Any


class PolicyStream:
    def __init__(self, policy) -> None:
        self._rules = policy.rules
        self._raw = ""  # all text pushed
        self._committed = 0  # raw offset up to which output was decided
        self._items: deque[list[Any]] = deque()  # [start, end | None, item]
        self._spans: list[tuple[int, int]] = []  # replaced matches (raw offsets)
        self._stop_at: int | None = None
        self.hits: dict[str, None] = {}  # rule names, in the order first hit
        self.stopped = False
        self.stop_rule = ""

    @property
    def held(self) -> int:
        """Characters pushed but not yet released."""
        return len(self._raw) - self._committed

    def push(self, delta: str, item: Any = None) -> tuple[str, list[Any]]:
        if self.stopped:
            return "", []
        start = len(self._raw)
        self._raw += delta
        if delta:
            for it in self._items:
                if it[1] is None:  # text held by the detokenizer arrived with this delta
                    it[1] = len(self._raw)
        if item is not None:
            self._items.append([start, len(self._raw) if delta else None, item])
        text = self._scan(final=False) if delta else ""
        return text, self._release(final=False)

    def finish(self) -> tuple[str, list[Any]]:
        """No more text: decide and release what is held."""
        if self.stopped:
            return "", []
        for it in self._items:
            if it[1] is None:
                it[1] = len(self._raw)
        text = self._scan(final=True)
        return text, self._release(final=True)

    # ---- matching ---------------------------------------------------------------------
    def _scan(self, final: bool) -> str:
        raw, n, begin = self._raw, len(self._raw), self._committed
        hold = n
        found: list[tuple[int, int, int, int, Any]] = []  # (start, -len, rule i, m i, ...)
        for ri, rule in enumerate(self._rules):
            for mi, m in enumerate(rule.matchers):
                limit, pos = n, begin
                while pos <= n:
                    mt = m.search.search(raw, pos, partial=not final)
                    if mt is None:
                        break
                    s, e = mt.span()
                    if s > hold or (s == hold and rule.action != "stop"):
                        break
                    if not final and (mt.partial or e == n
                                      or m.extends.match(raw, s, partial=True) is not None):
                        limit = s  # could still become (or grow into) a different match
                        break
                    if m.validate is None or m.validate(mt.group()):
                        found.append((s, rule.action != "stop", s - e, ri, mi, (rule, m)))
                        pos = e if e > s else e + 1
                    else:
                        pos = s + 1
                if not final and limit < n - m.max_chars:
                    limit = n - m.max_chars  # the cap: such a match is never longer
                hold = min(hold, limit)
        found.sort(key=lambda f: f[:5])
        out: list[str] = []
        pos = begin
        for s, redacts, neg_len, _, _, (rule, m) in found:
            e = s - neg_len
            if s > hold or (s == hold and redacts):
                break
            if s < pos:
                continue  # overlaps a match already taken (leftmost, stop, longest wins)
            if redacts and e > hold:
                hold = s  # another rule may still claim this text: decide it later
                break
            out.append(raw[pos:s])
            self.hits.setdefault(rule.name, None)
            if rule.action == "stop":
                self.stopped, self.stop_rule, self._stop_at = True, rule.name, s
                self._committed = s
                return "".join(out)
            out.append(m.tag)
            self._spans.append((s, e))
            pos = e
        out.append(raw[pos:hold])
        self._committed = max(hold, pos)
        return "".join(out)

    # ---- items --------------------------------------------------------------------------
    def _release(self, final: bool) -> list[Any]:
        out = []
        while self._items:
            start, end, item = self._items[0]
            if self._stop_at is not None:
                if end is not None and end <= self._stop_at and not self._overlaps(start, end):
                    out.append(item)
                self._items.popleft()
                continue
            if end is None or end > self._committed:
                if not final:
                    break
            self._items.popleft()
            if not self._overlaps(start, end if end is not None else start):
                out.append(item)
        if self._stop_at is not None:
            self._items.clear()
        self._spans = [sp for sp in self._spans
                       if self._items and sp[1] > self._items[0][0]]
        return out

    def _overlaps(self, start: int, end: int) -> bool:
        return any(s < end and start < e for s, e in self._spans)
