"""The ONNX Runtime engine on its own: continuous batching gives each request the tokens
it gets alone; the router refuses exports of another adapter version."""

from __future__ import annotations

import json
from types import SimpleNamespace

from server.engine.types import FinishEvent, GenerationRequest, StoppingParams, TokenEvent
from server.onnx.engine import OnnxEngine, OnnxEngineConfig
from server.onnx.router import find_export
from server.onnx.session import OnnxDecoderSession


def _collect(handle) -> list[int]:
    ids = []
    while True:
        ev = handle.events.get(timeout=60)
        if isinstance(ev, TokenEvent):
            ids += ev.token_ids
        elif isinstance(ev, FinishEvent):
            return ids
        else:
            raise AssertionError(ev)


def test_batched_requests_match_their_solo_greedy_tokens(exported_root, onnx_model):
    from transformers import AutoTokenizer

    path = exported_root / "hot" / "onnx" / "fp32" / "model.onnx"
    tok = AutoTokenizer.from_pretrained(onnx_model)
    solo = OnnxDecoderSession(path)
    # uneven prompt lengths and lengths; a small token budget chunks the long prefill
    prompts = [tok.encode("Hello there")] + [list(range(5 + 7 * i, 5 + 7 * i + 3 + 9 * i))
                                              for i in range(5)]
    news = [12, 5, 20, 9, 16, 3]
    engine = OnnxEngine(path, tok, set(), 512,
                        OnnxEngineConfig(threads=1, max_batch_size=4, max_tokens_per_step=16))
    engine.start()
    try:
        handles = [engine.submit(GenerationRequest(
            f"r{i}", p, stopping=StoppingParams(n, ignore_eos=True)))
            for i, (p, n) in enumerate(zip(prompts, news, strict=True))]
        got = [_collect(h) for h in handles]
    finally:
        engine.stop()
    want = [solo.greedy(p, n)[0] for p, n in zip(prompts, news, strict=True)]
    assert got == want
    assert all(h.engine_path == "onnx" for h in handles)


def test_router_refuses_an_export_of_another_adapter_version(adapter_copy):
    manifest = json.loads((adapter_copy / "switchboard.json").read_text())
    fp = manifest["exports"]["onnx"]["fp32"]["base_model"]["fingerprint"]
    entry = SimpleNamespace(path=adapter_copy, version="2", adapter_id="hot")
    assert find_export(entry, "auto", fp)[0] == "int8"  # auto prefers int8
    # retrain the adapter in place (new weights): its exports no longer match
    weights = adapter_copy / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-4] + b"\0\0\0\0")
    reason = find_export(entry, "auto", fp)
    assert isinstance(reason, str) and reason.startswith("refused") and "version 2" in reason
    weights.write_bytes(original)
    assert "base fingerprint" in find_export(entry, "fp32", "other")
