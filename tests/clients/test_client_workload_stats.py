"""Adapter mix sampling, weights and prompt files, percentile math."""

from __future__ import annotations

import collections
import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.stats import percentile, summarize
from clients.workload import (
    AdapterMix,
    builtin_prompts,
    expand_adapter_ids,
    load_prompts_file,
    load_weights_file,
)


def _chi_square(mix: AdapterMix, n: int, seed: int = 1) -> float:
    rng = random.Random(seed)
    counts = collections.Counter(mix.sample(rng) for _ in range(n))
    return sum((counts[a] - n * p) ** 2 / (n * p)
               for a, p in zip(mix.adapter_ids, mix.probabilities, strict=True))


def test_zipf_probabilities_follow_the_formula():
    ids = expand_adapter_ids(5)
    mix = AdapterMix.zipf(ids, exponent=1.2)
    norm = sum(1 / k**1.2 for k in range(1, 6))
    for k, a in enumerate(ids, start=1):
        assert mix.probability(a) == pytest.approx(1 / k**1.2 / norm)
    assert AdapterMix.zipf(ids, 0.0).probabilities == AdapterMix.uniform(ids).probabilities


@pytest.mark.parametrize(
    "mix",
    [
        AdapterMix.uniform(expand_adapter_ids(10)),
        AdapterMix.zipf(expand_adapter_ids(20), 1.1),
        AdapterMix.from_weights({"a": 5, "b": 3, "c": 1, "": 1}),
    ],
    ids=["uniform", "zipf", "weights"],
)
def test_sampling_frequencies_match_probabilities(mix):
    # chi-square with k-1 <= 19 degrees of freedom: 99.9% quantile is 43.8
    assert _chi_square(mix, 40_000) < 43.8


def test_sampling_is_deterministic_per_seed_and_skips_zero_weights():
    mix = AdapterMix.from_weights([("a", 1.0), ("never", 0.0), ("b", 2.0)])
    seq = [mix.sample(random.Random(7)) for _ in range(3)]
    assert seq == [mix.sample(random.Random(7)) for _ in range(3)]
    assert "never" not in {mix.sample(random.Random(i)) for i in range(2000)}


@pytest.mark.parametrize(
    "weights, match",
    [({"a": -1.0}, "must be >= 0"), ({"a": 0.0}, "sum to 0"), ({}, "sum to 0"),
     ({"a": float("nan")}, "must be >= 0")],
)
def test_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        AdapterMix.from_weights(weights)


def test_expand_adapter_ids():
    assert expand_adapter_ids(3, "lora-{i:03d}", start=1) == ["lora-001", "lora-002", "lora-003"]
    with pytest.raises(ValueError, match="must contain"):
        expand_adapter_ids(3, "lora")
    with pytest.raises(ValueError, match="at least 1"):
        expand_adapter_ids(0)


@pytest.mark.parametrize(
    "content",
    [
        '{"a": 3, "b": 1}',
        '[["a", 3], ["b", 1]]',
        '[{"adapter_id": "a", "weight": 3}, {"adapter_id": "b", "weight": 1}]',
        "# id weight\na 3\nb,1\n\n",
    ],
)
def test_weights_file_formats(tmp_path, content):
    path = tmp_path / "w"
    path.write_text(content)
    assert load_weights_file(path) == {"a": 3.0, "b": 1.0}


def test_weights_file_errors_name_the_line(tmp_path):
    path = tmp_path / "w.txt"
    path.write_text("a 1\nb one\n")
    with pytest.raises(ValueError, match=r"w.txt:2: weight 'one'"):
        load_weights_file(path)


def test_prompt_files(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = ['"raw text"', '{"prompt": "p2"}',
             '{"messages": [{"role": "system", "content": "s"}, {"content": "u"}]}', ""]
    path.write_text("\n".join(lines))
    prompts = load_prompts_file(path)
    assert prompts[0].request_kwargs() == {"prompt": "raw text"}
    assert prompts[1].request_kwargs() == {"prompt": "p2"}
    assert prompts[2].request_kwargs() == {"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}
    path.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: expected"):
        load_prompts_file(path)


def test_builtin_prompts_are_varied_chats():
    prompts = builtin_prompts()
    assert len(prompts) >= 20
    assert all(p.messages for p in prompts)
    lengths = [sum(len(c) for _, c in p.messages) for p in prompts]
    assert max(lengths) > 5 * min(lengths)
    assert any(any(ord(ch) > 0x2E80 for _, c in p.messages for ch in c) for p in prompts)
    json.dumps([p.request_kwargs() for p in prompts])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=60),
       st.floats(0, 100))
def test_percentile_matches_numpy_linear(values, q):
    assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-9,
                                                  abs=1e-6)


def test_percentile_edges():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 0) == 1 and percentile([1, 2, 3, 4], 100) == 4
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 101)


def test_summarize():
    s = summarize([0.1 * i for i in range(1, 101)])
    assert s.count == 100 and s.max == pytest.approx(10.0)
    assert s.p50 == pytest.approx(5.05) and s.p99 == pytest.approx(9.901)
    assert s.mean == pytest.approx(5.05)
    assert summarize([]).p50 is None
