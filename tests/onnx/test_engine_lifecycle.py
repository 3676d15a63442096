"""The ONNX engine shares the PyTorch engine's request lifecycle (server/engine/lifecycle.py),
so it has what that lifecycle gives: a failing row fails alone, a row with non-finite logits
fails alone, cancel and deadline end a running request, and the step, inter-token and gauge
metrics are recorded.

The model here has one poisoned token: its input embedding is NaN (the output embedding is
untied, so other rows never see it). A request whose prompt holds it produces NaN logits in
its own row; a token id past the vocabulary makes ONNX Runtime raise for the whole step."""

from __future__ import annotations

import re
import time

import pytest
from safetensors.torch import load_file, save_file
from support import make_lora, make_tiny_model, wait_for

from server.engine.types import (
    ErrorEvent,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    StoppingParams,
    TokenEvent,
)
from server.metrics import ServerMetrics
from server.onnx.engine import OnnxEngine, OnnxEngineConfig
from server.onnx.session import OnnxDecoderSession

POISON = 40_000  # a token id whose input embedding is NaN
LONG = 4000  # tokens: longer than any machine decodes between two lines of a test
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def poisoned_export(tmp_path_factory):
    from trainer.onnx_export import export_onnx

    tmp = tmp_path_factory.mktemp("poisoned")
    model = make_tiny_model(tmp / "model", weight_scale=2.0, tied=False,
                            max_positions=LONG + 96)
    weights = model / "model.safetensors"
    state = load_file(str(weights))
    state["model.embed_tokens.weight"][POISON] = float("nan")
    save_file(state, str(weights), metadata={"format": "pt"})
    make_lora(model, tmp / "adapter", r=4, targets=TARGETS, seed=3)
    export_onnx(tmp / "adapter", quantize="none")
    return model, tmp / "adapter" / "onnx" / "fp32" / "model.onnx"


@pytest.fixture
def engine(poisoned_export):
    from transformers import AutoTokenizer

    model, path = poisoned_export
    eng = OnnxEngine(path, AutoTokenizer.from_pretrained(str(model)), set(), LONG + 96,
                     OnnxEngineConfig(threads=1, max_batch_size=4, max_tokens_per_step=64),
                     metrics=ServerMetrics())
    eng.start()
    yield eng
    eng.stop()


def _request(rid: str, prompt: list[int], n: int, **kw) -> GenerationRequest:
    return GenerationRequest(rid, prompt, stopping=StoppingParams(n, ignore_eos=True), **kw)


def _outcome(handle, timeout: float = 60.0):
    """(token ids, the final event)."""
    ids = []
    while True:
        ev = handle.events.get(timeout=timeout)
        if isinstance(ev, TokenEvent):
            ids += ev.token_ids
        else:
            return ids, ev


def _sample(engine, name: str, **labels) -> float:
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0


GOOD = [[5, 6, 7, 8], [11, 12, 13], [20, 21, 22, 23, 24]]


def _solo(poisoned_export, prompt, n):
    return OnnxDecoderSession(poisoned_export[1]).greedy(prompt, n)[0]


def test_a_row_with_nonfinite_logits_fails_alone(engine, poisoned_export):
    handles = [engine.submit(_request(f"g{i}", p, 6)) for i, p in enumerate(GOOD)]
    bad = engine.submit(_request("bad", [5, POISON, 7], 6))
    ids, ev = _outcome(bad)
    assert isinstance(ev, ErrorEvent) and ev.code == "INTERNAL"
    assert "non-finite logits" in ev.message and ids == []
    for h, p in zip(handles, GOOD, strict=True):
        ids, ev = _outcome(h)
        assert isinstance(ev, FinishEvent) and ev.reason == FinishReason.LENGTH
        assert ids == _solo(poisoned_export, p, 6)
    assert engine.idle()


def test_a_step_that_raises_fails_only_the_row_that_caused_it(engine, poisoned_export):
    # Decode rows first, so the failing prefill joins a step with running rows.
    handles = [engine.submit(_request(f"g{i}", p, 12)) for i, p in enumerate(GOOD)]
    for h in handles:
        assert isinstance(h.events.get(timeout=60), TokenEvent)
    bad = engine.submit(_request("bad", [5, 10**9, 7], 6))  # past the vocabulary
    ids, ev = _outcome(bad)
    assert isinstance(ev, ErrorEvent) and ev.code == "INTERNAL"
    assert "failed in the engine" in ev.message
    for h in handles:
        rest, ev = _outcome(h)
        assert isinstance(ev, FinishEvent) and ev.reason == FinishReason.LENGTH
        assert len(rest) == 11
    # the survivors' tokens are their solo greedy tokens: no row's cache was disturbed
    again = [engine.submit(_request(f"a{i}", p, 12)) for i, p in enumerate(GOOD)]
    for h, p in zip(again, GOOD, strict=True):
        assert _outcome(h)[0] == _solo(poisoned_export, p, 12)


def test_cancel_and_deadline_end_a_running_request(engine):
    long = engine.submit(_request("long", GOOD[0], LONG))
    assert isinstance(long.events.get(timeout=60), TokenEvent)
    wait_for(lambda: _sample(engine, "switchboard_requests_running") == 1, timeout=30)
    long.cancel()
    ids, ev = _outcome(long)
    assert isinstance(ev, FinishEvent) and ev.reason == FinishReason.CANCELLED
    assert ev.completion_tokens < LONG
    late = engine.submit(_request("late", GOOD[1], LONG, deadline=time.monotonic() + 0.3))
    ids, ev = _outcome(late)
    assert isinstance(ev, ErrorEvent) and ev.code == "DEADLINE_EXCEEDED"
    assert 0 < len(ids) < LONG, "the deadline passed while the request was running"
    wait_for(lambda: _sample(engine, "switchboard_requests_running") == 0, timeout=30)
    assert engine.idle()


def test_steps_and_inter_token_latency_are_recorded(engine):
    ids, ev = _outcome(engine.submit(_request("m", GOOD[2], 8)))
    assert isinstance(ev, FinishEvent) and len(ids) == 8
    assert _sample(engine, "switchboard_inter_token_latency_seconds_count") == 7
    assert _sample(engine, "switchboard_step_duration_seconds_count") >= 8
    assert _sample(engine, "switchboard_step_tokens_sum") == len(GOOD[2]) + 7


def test_structured_output_on_the_onnx_path(engine, poisoned_export):
    """The shared lifecycle masks constrained rows for ONNX Runtime too (EOS when the
    grammar is complete, ignore_eos or not); free rows in the same steps keep their solo
    greedy tokens."""
    from transformers import AutoTokenizer

    from server.engine.grammar import GrammarCompiler

    tok = AutoTokenizer.from_pretrained(str(poisoned_export[0]))
    pattern = r"(yes|no)-[a-z]{2,6}!"
    fmt = GrammarCompiler(tok, len(tok)).compile("regex", pattern)
    constrained = [engine.submit(_request(f"c{i}", p, 40, response_format=fmt))
                   for i, p in enumerate(GOOD)]
    free = [engine.submit(_request(f"f{i}", p, 12)) for i, p in enumerate(GOOD)]
    for h in constrained:
        ids, ev = _outcome(h)
        assert isinstance(ev, FinishEvent) and ev.reason == FinishReason.EOS
        assert re.fullmatch(pattern, tok.decode(ids)), tok.decode(ids)
    for h, p in zip(free, GOOD, strict=True):
        assert _outcome(h)[0] == _solo(poisoned_export, p, 12)


def test_a_row_whose_grammar_fails_fails_alone(engine, poisoned_export):
    """A matcher in its error state (a real one, driven there by a token its grammar
    refuses) fails its own request with INTERNAL; the rows beside it finish as alone."""
    from transformers import AutoTokenizer

    from server.engine.grammar import GrammarCompiler

    tok = AutoTokenizer.from_pretrained(str(poisoned_export[0]))
    fmt = GrammarCompiler(tok, len(tok)).compile("regex", "(yes|no)")

    class Broken(type(fmt)):
        def matcher(self):
            m = super().matcher()
            assert not m.consume(tok.encode("x", add_special_tokens=False)[0])
            return m

    broken = Broken(fmt.kind, fmt.text, fmt._template, fmt.eos_id, fmt.words)
    free = [engine.submit(_request(f"f{i}", p, 8)) for i, p in enumerate(GOOD)]
    bad = engine.submit(_request("bad", GOOD[0], 8, response_format=broken))
    ids, ev = _outcome(bad)
    assert isinstance(ev, ErrorEvent) and ev.code == "INTERNAL", ev
    assert "structured output" in ev.message and ids == []
    for h, p in zip(free, GOOD, strict=True):
        assert _outcome(h)[0] == _solo(poisoned_export, p, 8)
    assert engine.idle()
