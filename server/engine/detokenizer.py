"""Incremental detokenization with stop sequences.

Text is released only when it is final: a trailing incomplete UTF-8 character (decoded
as U+FFFD) and any tail that could still become a stop sequence are held back. The
released deltas therefore concatenate exactly to the final text, and a stop sequence is
never part of it, even when it spans several tokens.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop_sequences: tuple[str, ...] = ()) -> None:
        self._tok = tokenizer
        self._stops = tuple(s for s in stop_sequences if s)
        self._ids: list[int] = []
        self._text = ""  # decoded text of all ids
        self.emitted = 0  # characters released so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the newly final text. Sets `stopped` on a stop sequence."""
        self._ids.append(token_id)
        self._text = self._tok.decode(self._ids, skip_special_tokens=True)
        if self._stops:
            search_from = max(0, self.emitted - max(len(s) for s in self._stops))
            hits = [i for s in self._stops if (i := self._text.find(s, search_from)) >= 0]
            if hits:
                self.stopped = True
                self._text = self._text[: min(hits)]
                return self._release(len(self._text))
        end = len(self._text)
        while end > self.emitted and self._text[end - 1] == "\ufffd":
            end -= 1
        end -= self._partial_stop(self._text[:end])
        return self._release(max(end, self.emitted))

    def flush(self) -> str:
        """At the end of generation: release everything still held back."""
        return self._release(len(self._text))

    def _release(self, end: int) -> str:
        delta = self._text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta

    def _partial_stop(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop sequence."""
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
