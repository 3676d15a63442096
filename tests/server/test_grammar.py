"""Structured output in the engine, without a server: compiling response formats (the
cache, the errors), the masks, and that masked sampling stays inside the grammar while
free rows are left bit for bit as they were."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from support import default_model_dir

from server.api.convert import RequestConverter
from server.api.errors import InvalidArgument
from server.config import Limits
from server.engine.grammar import GrammarCompiler, GrammarError, mask_logits, unpack_bitmask
from server.engine.sampling import select_tokens
from server.engine.types import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["city", "river"]},
        "tags": {"type": "array", "items": {"enum": ["old", "big"]}, "maxItems": 2},
    },
    "required": ["name", "kind", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, len(tokenizer))


def test_compile_cache_compiles_each_format_once_and_evicts_the_least_recent(tokenizer):
    results = []
    c = GrammarCompiler(tokenizer, len(tokenizer), cache_size=2, on_compile=results.append)
    schema = json.dumps(SCHEMA)
    first = c.compile("json_schema", schema)
    assert c.compile("json_schema", schema) is first  # not compiled again
    assert (c.compiled, c.hits) == (1, 1)
    c.compile("regex", "[0-9]+")
    c.compile("json_object", "")
    assert (c.compiled, c.hits) == (3, 1)
    # the schema was the least recently used of three in a cache of two: compiled again
    assert c.compile("json_schema", schema) is not first
    assert c.compile("json_object", "") is not None
    assert (c.compiled, c.hits) == (4, 2)
    assert results == ["compiled", "cached", "compiled", "compiled", "compiled", "cached"]


@pytest.mark.parametrize("kind,text,problem", [
    ("json_schema", '{"type": "objekt"}', "objekt"),
    ("json_schema", '{"type": ', "not valid JSON"),
    ("json_schema", '["a"]', "must be a JSON object"),
    ("json_schema", '{"$ref": "#/$defs/missing"}', "missing"),
    ("regex", "a(b", "unclosed group"),
])
def test_a_format_the_library_cannot_compile_is_refused_with_the_reason(compiler, kind, text,
                                                                        problem):
    with pytest.raises(GrammarError, match=problem.replace("$", r"\$")):
        compiler.compile(kind, text)


def test_converter_names_response_format_and_the_limit(tokenizer, compiler):
    conv = RequestConverter(tokenizer, len(tokenizer), 512,
                            Limits(max_response_format_chars=100), compiler)
    with pytest.raises(InvalidArgument, match=r"^response_format.json_schema cannot be "
                       r"compiled: .*objekt"):
        conv.response_format("json_schema", '{"type": "objekt"}')
    with pytest.raises(InvalidArgument, match=r"response_format.regex has 101 characters; "
                       r"the limit is 100"):
        conv.response_format("regex", "a" * 101)
    with pytest.raises(InvalidArgument, match="response_format.regex is empty"):
        conv.response_format("regex", "")
    with pytest.raises(InvalidArgument, match="'yaml' is not one of json_schema"):
        conv.response_format("yaml", "a: 1")
    assert conv.response_format("json_object", "ignored").kind == "json_object"


def test_unpack_bitmask_matches_the_bit_order_and_forbids_ids_past_the_vocabulary():
    rng = np.random.default_rng(0)
    bm = rng.integers(-2**31, 2**31 - 1, (3, 5), dtype=np.int32)
    ref = np.array([[bool((int(bm[i, t // 32]) >> (t % 32)) & 1) for t in range(160)]
                    for i in range(3)])
    assert (unpack_bitmask(bm, 160) == ref).all()
    assert (unpack_bitmask(bm, 150) == ref[:, :150]).all()
    wide = unpack_bitmask(bm, 170)  # logits wider than the grammar's vocabulary
    assert (wide[:, :160] == ref).all() and not wide[:, 160:].any()


def _json_tokens(tokenizer, value) -> list[int]:
    return tokenizer.encode(json.dumps(value, separators=(",", ":")), add_special_tokens=False)


def test_a_matcher_follows_a_valid_answer_to_its_end_and_rejects_a_wrong_token(tokenizer,
                                                                                compiler):
    fmt = compiler.compile("json_schema", json.dumps(SCHEMA))
    m = fmt.matcher()
    ids = _json_tokens(tokenizer, {"name": "Rome", "kind": "city", "tags": ["old"]})
    for tok in ids[:-1]:
        assert m.consume(tok) and not m.done
    assert m.consume(ids[-1]) and m.done
    other = fmt.matcher()  # a fresh copy: the template was not advanced
    assert not other.done
    assert not other.consume(tokenizer.encode("x", add_special_tokens=False)[0])
    assert other.error is not None


def test_masked_rows_sample_only_allowed_tokens_and_free_rows_are_untouched(tokenizer,
                                                                          compiler):
    """Rows 1 and 3 constrained, 0 and 2 free; logits wider than the tokenizer (padded
    embeddings). Greedy and sampled (temperature, top-k, top-p after the mask) rows
    only ever pick a token their grammar allows; the free rows' logits keep every bit."""
    vocab = len(tokenizer) + 64
    fmt = compiler.compile("json_schema", json.dumps(SCHEMA))
    regex = compiler.compile("regex", "(yes|no)")
    g = torch.Generator().manual_seed(1)
    for step in range(10):
        logits = torch.randn(4, vocab, generator=g) * 5
        logits[:, len(tokenizer):] = 100.0  # the padding would win were it not masked
        before = logits.clone()
        matchers = [fmt.matcher(), regex.matcher()]
        assert mask_logits(logits, [(1, matchers[0]), (3, matchers[1])]) == []
        assert torch.equal(logits[[0, 2]], before[[0, 2]])
        allowed1 = torch.isfinite(logits[1]).nonzero().flatten().tolist()
        allowed3 = torch.isfinite(logits[3]).nonzero().flatten().tolist()
        assert {tokenizer.decode([t]) for t in allowed3} <= {"y", "ye", "yes", "n", "no"}
        assert allowed1 and all(tokenizer.decode([t]).startswith("{") for t in allowed1)
        params = [SamplingParams(), SamplingParams(temperature=1.5, top_k=50, top_p=0.9),
                  SamplingParams(), SamplingParams()] if step % 2 else \
                 [SamplingParams(temperature=1.0)] * 4
        gens = [torch.Generator().manual_seed(step * 4 + i) if not p.greedy else None
                for i, p in enumerate(params)]
        tokens, _, _ = select_tokens(logits, params, [None] * 4, gens, [False] * 4)
        assert tokens[1] in allowed1 and tokens[3] in allowed3
        assert all(m.consume(t) for m, t in zip(matchers, [tokens[1], tokens[3]], strict=True))


def test_a_matcher_in_its_error_state_fails_only_its_row(tokenizer, compiler):
    fmt = compiler.compile("regex", "(yes|no)")
    good, bad = fmt.matcher(), fmt.matcher()
    assert not bad.consume(tokenizer.encode("x", add_special_tokens=False)[0])
    logits = torch.zeros(3, len(tokenizer))
    assert mask_logits(logits, [(0, good), (2, bad)]) == [2]
    assert torch.isfinite(logits[0]).sum() == 5 and torch.isfinite(logits[1]).all()
