"""Incremental text: deltas concatenate to the full text; stop sequences across tokens."""

from __future__ import annotations

import pytest
from support import default_model_dir

from server.engine.detokenizer import TextStream


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.mark.parametrize("text", ["北京是中国的首都。🙂👍🏽 Ünïcödé", "plain ascii, 123 tokens"])
def test_deltas_concatenate_to_text_with_multibyte(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(tokenizer)
    deltas = [stream.push(t) for t in ids]
    deltas.append(stream.flush())
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_sequence_across_token_boundaries_is_cut(tokenizer):
    text = "alpha beta<END>gamma"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 4
    stream = TextStream(tokenizer, ("<END>",))
    out = []
    for t in ids:
        out.append(stream.push(t))
        if stream.stopped:
            break
    assert stream.stopped
    assert "".join(out) == "alpha beta"


def test_partial_stop_prefix_held_back_then_released(tokenizer):
    stream = TextStream(tokenizer, ("xyz123",))
    ids = tokenizer.encode("ab xyz12 done", add_special_tokens=False)
    out = "".join(stream.push(t) for t in ids) + stream.flush()
    assert out == "ab xyz12 done" and not stream.stopped
