"""Structured output end to end, real server processes over gRPC. A tiny model with 8
LoRA adapters carries the load: 200 constrained requests and free ones share batches and
adapters; every constrained answer validates against its schema, and the free requests
give the same tokens as when no constrained row is in their batches. The default model
(SmolLM2-135M-Instruct) answers a schema, any JSON object and a regular expression."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import pytest
from support import ServerProcess, make_lora, metric

from clients.client import SwitchboardClient
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

ADAPTERS = [f"lora{i}" for i in range(8)]
WORD = {"type": "string", "pattern": "^[A-Za-z ]*$", "maxLength": 8}  # bounded: answers end
SCHEMA = {
    "type": "object",
    "properties": {
        "city": WORD,
        "kind": {"enum": ["capital", "port", "town"]},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999},
        "location": {
            "type": "object",
            "properties": {"country": WORD, "coast": {"type": "boolean"}},
            "required": ["country", "coast"],
            "additionalProperties": False,
        },
        "landmarks": {
            "type": "array",
            "items": {"type": "object",
                      "properties": {"name": WORD, "visited": {"type": "boolean"}},
                      "required": ["name"], "additionalProperties": False},
            "maxItems": 2,
        },
        "tags": {"type": "array", "items": {"enum": ["old", "big", "cold", "warm"]},
                 "minItems": 1, "maxItems": 3},
    },
    "required": ["city", "kind", "location", "tags"],
    "additionalProperties": False,
}
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Hanoi", "Rome", "Dakar",
          "Perth", "Bergen", "Porto", "Kyoto"]
CONSTRAINED = 200
MAX_NEW = 160  # more than the schema's longest answer (bounded strings, arrays, integer)


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(ADAPTERS):
        make_lora(tiny_model, root / name, r=4, targets=["q_proj", "v_proj"], seed=i)
    s = ServerProcess(["--base-model", tiny_model, "--adapter-dir", root,
                       "--preload", ",".join(ADAPTERS), "--max-batch-size", "32",
                       "--max-seq-len", "256", "--metrics-port", "0",
                       # one engine thread: on a shared 2-core machine two OpenMP threads
                       # wait on each other at every op (a 49k-entry sort: 4 ms -> 26 ms)
                       "--threads", "1"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def default_server():
    s = ServerProcess(["--max-seq-len", "512", "--kv-cache-memory", "128MiB", "--threads", "1"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(server):
    return pb_grpc.TextGenerationStub(grpc.insecure_channel(server.target))


def _request(i: int, *, schema: bool, max_new: int = MAX_NEW) -> pb.GenerateRequest:
    """Request i: adapter i % 8; even i greedy, odd i sampled with its own seed."""
    city = CITIES[i % len(CITIES)]
    req = pb.GenerateRequest(
        request_id=f"{'s' if schema else 'f'}{i}", adapter_id=ADAPTERS[i % 8],
        messages=pb.ChatMessages(messages=[pb.ChatMessage(
            role="user", content=f"Describe the city of {city} as JSON.")]),
        stopping=pb.StoppingCriteria(max_new_tokens=max_new),
        response=pb.ResponseOptions(token_ids=True))
    if i % 2:
        req.sampling.temperature = 0.9
        req.sampling.top_p = 0.95
        req.sampling.seed = 1000 + i
    if schema:
        req.response_format.json_schema = json.dumps(SCHEMA)
    return req


def _run(stub, requests: list[pb.GenerateRequest], workers: int) -> dict[str, pb.GenerateResponse]:
    with ThreadPoolExecutor(workers) as pool:
        out = list(pool.map(lambda r: stub.Generate(r, timeout=600), requests))
    return {r.request_id: r for r in out}


@pytest.mark.slow  # 30 s: `make test` stays under 10 minutes; make test-slow runs it
def test_constrained_and_free_rows_share_batches_and_adapters(server, stub):
    """200 constrained requests (greedy and sampled, over 8 adapters) and 24 free ones,
    all in flight together; then the free ones again with no constrained row about."""
    compiled0 = metric(server.metrics_port, "switchboard_grammar_compiles_total",
                       result="compiled")
    constrained = [_request(i, schema=True) for i in range(CONSTRAINED)]
    free = [_request(i, schema=False, max_new=24) for i in range(24)]
    mixed = list(constrained)
    for k, f in enumerate(free):  # spread the free rows among the constrained ones
        mixed.insert(8 + k * 9, f)
    out = _run(stub, mixed, workers=40)

    for req in constrained:
        r = out[req.request_id]
        assert r.finish_reason == pb.FINISH_REASON_EOS, (req.request_id, r.text)
        jsonschema.validate(json.loads(r.text), SCHEMA)  # raises on any violation
        assert r.adapter_id == req.adapter_id
    texts = {out[r.request_id].text for r in constrained}
    assert len(texts) > 20  # adapters, cities and seeds give different answers
    # one schema, compiled once for all 200 requests
    assert metric(server.metrics_port, "switchboard_grammar_compiles_total",
                  result="compiled") - compiled0 == 1

    alone = _run(stub, free, workers=len(free))
    for req in free:
        assert list(out[req.request_id].token_ids) == list(alone[req.request_id].token_ids), \
            req.request_id
    assert any(not _is_json(alone[r.request_id].text) for r in free)  # free text, not JSON


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def test_the_default_model_answers_a_schema_any_json_object_and_a_regex(default_server):
    client = SwitchboardClient(default_server.target)
    msgs = [{"role": "user", "content": "Describe the city of Paris as JSON."}]
    for temperature in (0.0, 0.9):
        r = client.chat(msgs, json_schema=SCHEMA, max_new_tokens=MAX_NEW,
                        temperature=temperature, seed=3)
        assert r.finish_reason == "eos", r.text
        jsonschema.validate(json.loads(r.text), SCHEMA)
    ask = 'Give the capital of France as a JSON object with the key "capital".'
    r = client.chat([{"role": "user", "content": ask}], json_object=True, max_new_tokens=96)
    assert r.finish_reason == "eos" and isinstance(json.loads(r.text), dict), r.text
    assert "Paris" in r.text
    msgs = [{"role": "user", "content": "Is Paris the capital of France?"}]
    pattern = r"(yes|no), because [a-z ]{1,40}\."
    for temperature in (0.0, 1.0):
        r = client.chat(msgs, regex=pattern, max_new_tokens=64, temperature=temperature,
                        seed=7)
        assert r.finish_reason == "eos" and re.fullmatch(pattern, r.text), r.text


def test_a_bad_schema_is_invalid_argument_naming_the_field_and_the_server_goes_on(stub):
    bad = _request(0, schema=False)
    bad.response_format.json_schema = '{"type": "object", "properties": {"a": {"type": 7}}}'
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(bad, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("response_format.json_schema cannot be compiled:")
    bad.response_format.regex = "[a-z"
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(bad, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "response_format.regex" in e.value.details()
    ok = _request(2, schema=True)
    assert stub.Generate(ok, timeout=120).finish_reason == pb.FINISH_REASON_EOS


def test_the_compile_cache_compiles_a_schema_once(server, stub):
    counts = {k: metric(server.metrics_port, "switchboard_grammar_compiles_total", result=k)
              for k in ("compiled", "cached")}
    req = _request(4, schema=False, max_new=16)
    req.response_format.regex = "[a-z]{1,6} cache test"  # a format no other test sends
    for _ in range(2):
        stub.Generate(req, timeout=120)
    now = {k: metric(server.metrics_port, "switchboard_grammar_compiles_total", result=k)
           for k in counts}
    assert (now["compiled"] - counts["compiled"], now["cached"] - counts["cached"]) == (1, 1)
