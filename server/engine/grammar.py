"""Structured output: a response format (a JSON schema, any JSON object, or a regular
expression) compiled once per format into a grammar, a matcher per request, and the
per-step masks that keep the constrained rows of a batch inside their grammars.

The grammar library is llguidance (why, with figures: docs/structured-output.md). Its
matchers never raise on bad grammars or tokens; they enter an error state, which we turn
into INVALID_ARGUMENT at compile time and into a failure of the one row at step time.

    compiler = GrammarCompiler(tokenizer, vocab_size)
    fmt = compiler.compile("json_schema", schema_text)   # cached per (kind, text)
    matcher = fmt.matcher()                              # one per request
    failed = mask_logits(logits, [(row, matcher), ...])  # before sampling, every step
    matcher.consume(token)                               # after sampling
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # compiling needs no torch (the API layer imports this module)
    import torch

log = logging.getLogger(__name__)

KINDS = ("json_schema", "json_object", "regex")
# JSON without free whitespace: "," and ":" as separators. A small model given the choice
# of whitespace can spend its whole budget on newlines; compact JSON parses the same.
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A response format the grammar library cannot compile; the message says why."""


class GrammarMatcher:
    """One request's position in its grammar."""

    __slots__ = ("_m", "eos_id", "words")

    def __init__(self, matcher, eos_id: int, words: int) -> None:
        self._m = matcher
        self.eos_id = eos_id  # the token that ends the grammar (the tokenizer's EOS)
        self.words = words  # int32 words of its bitmask: ceil(vocabulary / 32)

    def consume(self, token: int) -> bool:
        """Advance by the sampled token; False when the grammar rejects it (the matcher
        is then in its error state)."""
        return bool(self._m.consume_token(token))

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but its end can follow."""
        return bool(self._m.is_stopped())

    @property
    def error(self) -> str | None:
        return (self._m.get_error() or "the grammar rejected the answer") \
            if self._m.is_error() else None


class ResponseFormat:
    """A compiled response format: what goes on GenerationRequest.response_format. Holds a
    matcher that is never advanced; every request gets its own copy."""

    def __init__(self, kind: str, text: str, template, eos_id: int, words: int) -> None:
        self.kind = kind
        self.text = text
        self._template = template
        self.eos_id = eos_id
        self.words = words  # int32 words of one row's bitmask: ceil(vocab / 32)

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._template.deep_copy(), self.eos_id, self.words)

    def __repr__(self) -> str:
        return f"ResponseFormat({self.kind}, {len(self.text)} chars)"


class GrammarCompiler:
    """Compiles response formats for one tokenizer, with an LRU cache keyed by
    (kind, text). Thread-safe; the tokenizer's grammar view is built on first use (about
    a third of a second for a 49k vocabulary), so a server without structured output
    never pays for it.

    `on_compile(result)` is told "compiled", "cached" or "invalid" for every call (the
    server counts them in switchboard_grammar_compiles_total)."""

    def __init__(self, tokenizer, vocab_size: int, cache_size: int = 256,
                 on_compile: Callable[[str], None] | None = None) -> None:
        self.tokenizer = tokenizer
        # Logits may be wider than the tokenizer (padded embeddings): those extra ids
        # are never allowed. A tokenizer wider than the logits keeps its own size.
        self.vocab_size = max(vocab_size, len(tokenizer))
        self.cache_size = cache_size
        self.on_compile = on_compile or (lambda result: None)
        self.compiled = 0  # formats compiled (cache misses that succeeded)
        self.hits = 0
        self._cache: OrderedDict[tuple[str, str], ResponseFormat] = OrderedDict()
        self._lock = threading.Lock()
        self._lltok = None

    def _ll_tokenizer(self):
        if self._lltok is None:
            import llguidance.hf

            eos = self.tokenizer.eos_token_id
            self._lltok = llguidance.hf.from_tokenizer(
                self.tokenizer, n_vocab=self.vocab_size, eos_token=eos if eos is not None else 0)
        return self._lltok

    def compile(self, kind: str, text: str) -> ResponseFormat:
        """-> the compiled format; raises GrammarError naming the problem. One compile at
        a time (about a millisecond for a nested schema; llguidance bounds the worst)."""
        key = (kind, text)
        with self._lock:
            fmt = self._cache.get(key)
            if fmt is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                self.on_compile("cached")
                return fmt
            try:
                fmt = self._compile(kind, text)
            except GrammarError:
                self.on_compile("invalid")
                raise
            self.compiled += 1
            self.on_compile("compiled")
            self._cache[key] = fmt
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return fmt

    def _compile(self, kind: str, text: str) -> ResponseFormat:
        import llguidance

        if kind == "json_schema":
            try:
                schema = json.loads(text)
            except ValueError as e:
                raise GrammarError(f"is not valid JSON: {e}") from None
            if not isinstance(schema, dict | bool):
                raise GrammarError(f"must be a JSON object, not {type(schema).__name__}")
            source = schema
        elif kind == "json_object":
            source = {"type": "object"}
        elif kind == "regex":
            source = None
        else:
            raise GrammarError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        try:
            if source is None:
                grammar = llguidance.LLMatcher.grammar_from_regex(text)
            else:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    source, defaults=_JSON_OPTIONS)
        except Exception as e:  # the library's refusal of the caller's text, whatever type
            raise GrammarError(_first_line(str(e))) from None
        lltok = self._ll_tokenizer()
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        words = (self.vocab_size + 31) // 32
        if not matcher.is_error():  # some problems show only when the first mask is made
            first = np.zeros(words, np.int32)
            matcher.unsafe_compute_mask_ptr(first.ctypes.data, words * 4)
        if matcher.is_error():
            raise GrammarError(_first_line(matcher.get_error()))
        return ResponseFormat(kind, text, matcher, lltok.eos_token, words)


def _first_line(message: str) -> str:
    """llguidance's errors end with a dump of the parser's state; keep what names the
    problem."""
    lines = [ln for ln in message.strip().splitlines() if ln.strip()]
    keep = []
    for ln in lines:
        if ln.startswith("<state>"):
            break
        keep.append(ln.strip())
    return " ".join(keep)[:500] or "the grammar library refused it"


_executor = None
_executor_lock = threading.Lock()


def _ll_executor():
    """llguidance's thread pool for computing the masks of a batch in parallel."""
    global _executor
    with _executor_lock:
        if _executor is None:
            import llguidance

            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2
            _executor = llguidance.LLExecutor(num_threads=max(1, min(cores, 8)))
        return _executor


def mask_logits(logits: torch.Tensor, rows: list[tuple[int, GrammarMatcher]]) -> list[int]:
    """In place on float32 CPU logits [R, V]: each constrained row i gets -inf wherever
    its grammar forbids the next token (before any temperature, top-k or top-p, so that
    no filter can bring a forbidden token back). Rows not named are untouched. -> the rows
    whose matcher is in its error state or allows no token (fail those requests).

    The masking runs in numpy, one thread: on a CPU whose cores the engine's OpenMP team
    already uses, a few full-width torch ops per step cost more waiting than work."""
    if not rows:
        return []
    words = rows[0][1].words
    bitmask = np.zeros((len(rows), words), np.int32)
    _ll_executor().unsafe_compute_mask_ptr(
        [(m._m, k) for k, (_, m) in enumerate(rows)], bitmask.ctypes.data, words * 4,
        len(rows))
    width = logits.shape[-1]
    allowed = unpack_bitmask(bitmask, width)
    out = logits.numpy()  # shares memory with the tensor
    failed = []
    for k, (i, m) in enumerate(rows):
        np.putmask(out[i], ~allowed[k], -np.inf)
        if m.error is not None or not allowed[k].any():
            failed.append(i)
    return failed


def unpack_bitmask(bitmask: np.ndarray, width: int) -> np.ndarray:
    """[n, words] int32 (bit t % 32 of word t // 32 set: token t allowed) -> [n, width]
    bool; tokens at or past words * 32 (logits wider than the grammar's vocabulary) are
    forbidden. (A little-endian int32 holds its bits 0-7, 8-15, ... in byte order; every
    platform torch ships for is little-endian.)"""
    n, words = bitmask.shape
    bits = np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), axis=1,
                         bitorder="little").view(bool)
    if width <= words * 32:
        return bits[:, :width]
    return np.concatenate([bits, np.zeros((n, width - words * 32), bool)], axis=1)
