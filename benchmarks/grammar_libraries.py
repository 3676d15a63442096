"""xgrammar against llguidance on this machine: the figures behind the choice of grammar
library (docs/structured-output.md).

Only the chosen library is a dependency; to rerun the comparison install the other one
beside it, e.g. into a folder on PYTHONPATH:

    pip install --no-deps --target /tmp/sg xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 \
        llguidance==1.9.1
    PYTHONPATH=/tmp/sg .venv/bin/python -m benchmarks.grammar_libraries

Measured, with the default model's tokenizer (SmolLM2, 49152 tokens):
- tokenizer set-up (once per server);
- compile: a nested JSON schema to a matcher with its first mask computed (what a new
  schema costs a request before its first token); xgrammar with its cache off;
- mask: per decode step, the masks of a batch of rows that each follow a valid answer of
  that schema, then each row advances by its token; the figure is per step for the batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "kind": {"enum": ["city", "river", "mountain", "island"]},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        "location": {
            "type": "object",
            "properties": {
                "country": {"type": "string", "maxLength": 16},
                "coast": {"type": "boolean"},
                "neighbours": {"type": "array", "items": {"type": "string", "maxLength": 12},
                               "maxItems": 3},
            },
            "required": ["country", "coast"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["old", "big", "cold", "warm"]},
                 "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "kind", "location", "tags"],
    "additionalProperties": False,
}
ANSWER = {"name": "Paris", "kind": "city", "population": 2100000,
          "location": {"country": "France", "coast": False, "neighbours": ["Lyon"]},
          "tags": ["old", "big"]}


def _tokens(tokenizer) -> list[int]:
    text = json.dumps(ANSWER, separators=(",", ":"))
    return tokenizer.encode(text, add_special_tokens=False)


def bench_xgrammar(tokenizer, vocab: int, rows: int, threads: int, rounds: int) -> dict:
    import torch
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    setup = time.perf_counter() - t0
    schema = json.dumps(SCHEMA)
    compiles = []
    for _ in range(rounds):
        compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        mask = xgr.allocate_token_bitmask(1, vocab)
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(schema, any_whitespace=False,
                                                separators=(",", ":"))
        m = xgr.GrammarMatcher(compiled)
        m.fill_next_token_bitmask(mask, 0)
        compiles.append(time.perf_counter() - t0)
    ids = _tokens(tokenizer)
    batch = xgr.BatchGrammarMatcher(max_threads=threads)
    steps = []
    for _ in range(rounds):
        matchers = [xgr.GrammarMatcher(compiled) for _ in range(rows)]
        bitmask = xgr.allocate_token_bitmask(rows, vocab)
        for tok in ids:
            t0 = time.perf_counter()
            batch.batch_fill_next_token_bitmask(matchers, bitmask)
            for m in matchers:
                assert m.accept_token(tok)
            steps.append(time.perf_counter() - t0)
        logits = torch.zeros(rows, vocab)
        t0 = time.perf_counter()
        xgr.apply_token_bitmask_inplace(logits, bitmask)
    return {"tokenizer_setup_s": setup, "compile_ms": 1e3 * statistics.median(compiles),
            "mask_step_ms": 1e3 * statistics.median(steps), "steps": len(ids)}


def bench_llguidance(tokenizer, vocab: int, rows: int, threads: int, rounds: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    setup = time.perf_counter() - t0
    opts = {"whitespace_flexible": False}
    compiles = []
    for _ in range(rounds):
        mask = llt.allocate_token_bitmask(1, vocab)
        t0 = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=opts)
        m = llguidance.LLMatcher(lltok, grammar, log_level=0)
        llt.fill_next_token_bitmask(m, mask, 0)
        compiles.append(time.perf_counter() - t0)
        assert not m.is_error(), m.get_error()
    ids = _tokens(tokenizer)
    executor = llguidance.LLExecutor(num_threads=threads)
    steps = []
    for _ in range(rounds):
        matchers = [llguidance.LLMatcher(lltok, grammar, log_level=0) for _ in range(rows)]
        bitmask = llt.allocate_token_bitmask(rows, vocab)
        for tok in ids:
            t0 = time.perf_counter()
            llt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)],
                                            bitmask)
            for m in matchers:
                assert m.consume_token(tok), m.get_error()
            steps.append(time.perf_counter() - t0)
    return {"tokenizer_setup_s": setup, "compile_ms": 1e3 * statistics.median(compiles),
            "mask_step_ms": 1e3 * statistics.median(steps), "steps": len(ids)}


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from server.model_store import default_model_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16, help="constrained rows per step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    vocab = len(tokenizer)
    results = {}
    for name, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
        try:
            results[name] = fn(tokenizer, vocab, a.rows, a.threads, a.rounds)
        except ImportError as e:
            print(f"{name}: not installed ({e})")
    print(f"{'library':<12} {'tokenizer set-up s':>18} {'compile+1st mask ms':>20} "
          f"{f'mask {a.rows} rows/step ms':>22}")
    for name, r in results.items():
        print(f"{name:<12} {r['tokenizer_setup_s']:>18.2f} {r['compile_ms']:>20.1f} "
              f"{r['mask_step_ms']:>22.3f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
