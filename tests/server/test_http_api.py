"""The OpenAI-compatible HTTP API against a real server process, through the official
`openai` package: models, completions and chat completions (unary and streamed, base and
adapter) equal to the gRPC answer, usage, logprobs, n, stop, the error statuses in
OpenAI's error shape, and a client that goes away mid-stream."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request

import grpc
import openai
import pytest
from support import ServerProcess, http_call, make_lora, metric, wait_for

from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

ADAPTER = "tenant-a"
PROMPT = "The weather today"
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def adapter_root(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_lora(tiny_model, root / ADAPTER, r=8, targets=["q_proj", "v_proj"], seed=1)
    return root


@pytest.fixture(scope="module")
def server(tiny_model, adapter_root):
    s = ServerProcess(["--base-model", tiny_model, "--adapter-dir", adapter_root,
                       "--max-seq-len", "1100", "--kv-cache-memory", "64MiB",
                       "--max-new-tokens", "1000", "--max-stop-sequences", "4",
                       "--http-port", "0", "--metrics-port", "0"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def base_id(tiny_model) -> str:
    return str(tiny_model)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.http_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def grpc_stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.TextGenerationStub(channel)


raw = http_call  # (status, headers, body text) of a plain HTTP call


def test_health_and_models(server, client, base_id):
    assert raw(server, "/health")[:1] == (200,)
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {base_id, ADAPTER}
    assert models[base_id].root == base_id and models[base_id].parent is None
    assert models[ADAPTER].root == base_id and models[ADAPTER].parent == base_id
    assert client.models.retrieve(ADAPTER).id == ADAPTER


def _grpc_answer(stub, adapter: str, chat: bool, n: int) -> pb.GenerateResponse:
    req = pb.GenerateRequest(adapter_id=adapter, stopping=pb.StoppingCriteria(max_new_tokens=n),
                             response=pb.ResponseOptions(logprobs=True))
    if chat:
        req.messages.CopyFrom(pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in CHAT]))
    else:
        req.prompt = PROMPT
    return stub.Generate(req, timeout=60)


FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_EOS: "stop"}


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
@pytest.mark.parametrize("adapter", ["", ADAPTER], ids=["base", "adapter"])
def test_greedy_unary_stream_and_grpc_agree(client, grpc_stub, base_id, adapter, chat):
    model = adapter or base_id
    want = _grpc_answer(grpc_stub, adapter, chat, 24)
    kw = dict(model=model, max_tokens=24, temperature=0)
    if chat:
        unary = client.chat.completions.create(messages=CHAT, **kw)
        text = unary.choices[0].message.content
        assert unary.object == "chat.completion"
        assert unary.choices[0].message.role == "assistant"
        chunks = list(client.chat.completions.create(
            messages=CHAT, stream=True, stream_options={"include_usage": True}, **kw))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        unary = client.completions.create(prompt=PROMPT, **kw)
        text = unary.choices[0].text
        assert unary.object == "text_completion"
        chunks = list(client.completions.create(
            prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **kw))
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert want.text and text == want.text
    assert streamed == want.text
    assert unary.model == model
    assert unary.choices[0].finish_reason == FINISH[want.finish_reason]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == FINISH[want.finish_reason] and not any(finishes[:-1])
    for use in (unary.usage, chunks[-1].usage):
        assert (use.prompt_tokens, use.completion_tokens, use.total_tokens) == (
            want.prompt_tokens, want.completion_tokens,
            want.prompt_tokens + want.completion_tokens)
    assert chunks[-1].choices == []
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format_ends_with_done(server, base_id):
    status, headers, body = raw(server, "/v1/completions", {
        "model": base_id, "prompt": PROMPT, "max_tokens": 5, "temperature": 0,
        "stream": True, "ignore_eos": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_string_and_list(client, base_id):
    full = client.completions.create(model=base_id, prompt=PROMPT, max_tokens=30,
                                     temperature=0, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    cut = len(text) // 2
    stop = text[cut:cut + 3]
    prefix = text[:text.index(stop)]
    for value in (stop, ["zzzz-never", stop]):
        r = client.completions.create(model=base_id, prompt=PROMPT, max_tokens=30,
                                      temperature=0, stop=value, extra_body={"ignore_eos": True})
        assert r.choices[0].text == prefix
        assert r.choices[0].finish_reason == "stop"


def test_logprobs_match_grpc(client, grpc_stub, base_id):
    want = _grpc_answer(grpc_stub, "", False, 8)
    r = client.completions.create(model=base_id, prompt=PROMPT, max_tokens=8, temperature=0,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(list(want.logprobs), abs=1e-5)
    assert "".join(lp.tokens) == want.text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3  # greedy: the chosen token is the most likely one
        assert max(top.values()) == pytest.approx(chosen, abs=1e-6) and token in top
    c = client.chat.completions.create(model=base_id, messages=CHAT, max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(
        t.logprob, abs=1e-6) for t in content)
    assert all(bytes(t.bytes).decode() == t.token for t in content)


def test_n_choices_seed_and_usage(client, base_id):
    kw = dict(model=base_id, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7,
              extra_body={"ignore_eos": True})
    r = client.completions.create(n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    single = client.completions.create(**kw)
    assert r.usage.prompt_tokens == single.usage.prompt_tokens  # one prompt, counted once
    assert r.usage.completion_tokens == 3 * 12
    again = client.completions.create(**kw)
    assert again.choices[0].text == single.choices[0].text  # same seed, same sample
    assert r.choices[0].text == single.choices[0].text  # choice j samples with seed + j
    assert len({c.text for c in r.choices}) > 1
    assert r.choices[1].text == client.completions.create(**{**kw, "seed": 8}).choices[0].text
    greedy = client.completions.create(n=2, **{**kw, "temperature": 0})
    assert greedy.choices[0].text == greedy.choices[1].text
    chunks = list(client.chat.completions.create(
        model=base_id, messages=CHAT, max_tokens=5, temperature=0, n=2, stream=True))
    by_index = {0: "", 1: ""}
    for ch in chunks:
        for c in ch.choices:
            by_index[c.index] += c.delta.content or ""
    assert by_index[0] == by_index[1] and by_index[0]


@pytest.mark.parametrize("adapter", ["", ADAPTER], ids=["base", "adapter"])
def test_n_choices_share_the_prefill(server, client, base_id, adapter):
    """n = 4: the first choice computes the prompt (but the 192 tokens of its 12 full
    blocks, which the single request before left in the prefix cache), the other three
    copy its keys and values and compute only the last prompt token (the engine's own
    token count says so), and every greedy choice equals the answer to a single request."""
    prompt = list(range(1000, 1200))  # 200 token ids
    kw = dict(model=adapter or base_id, prompt=prompt, max_tokens=6, temperature=0,
              extra_body={"ignore_eos": True})
    single = client.completions.create(**kw).choices[0].text
    before = metric(server.metrics_port, "switchboard_step_tokens_sum")
    r = client.completions.create(n=4, **kw)
    processed = metric(server.metrics_port, "switchboard_step_tokens_sum") - before
    assert [c.text for c in r.choices] == [single] * 4
    assert processed == (200 - 192) + 3 * 1 + 4 * (6 - 1)  # not 4 * 200 + 4 * 5
    assert r.usage.prompt_tokens == 200 and r.usage.completion_tokens == 24
    assert r.usage.prompt_tokens_details.cached_tokens == 192


BAD = [  # (endpoint, body fields, param, words in the message)
    ("completions", {"temperature": -1}, "temperature", "[0, 100]"),
    ("completions", {"top_p": 1.5}, "top_p", "(0, 1]"),
    ("completions", {"max_tokens": 5000}, "max_tokens", "greater than the limit 1000"),
    ("chat", {"max_completion_tokens": 5000}, "max_completion_tokens", "limit 1000"),
    ("completions", {"max_tokens": 0}, "max_tokens", "at least 1"),
    ("completions", {"n": 0}, "n", "n must be in [1,"),
    ("completions", {"n": 10_000}, "n", "n must be in [1,"),
    ("completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop", "the limit is 4"),
    ("completions", {"stop": 5}, "stop", "string or an array"),
    ("completions", {"presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
    ("chat", {"frequency_penalty": -2.5}, "frequency_penalty", "[-2, 2]"),
    ("completions", {"logprobs": 6}, "logprobs", "[0, 5]"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "limit 20"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "messages", "'robot'"),
    ("chat", {"messages": []}, "messages", "non-empty"),
    ("completions", {"prompt": None}, "prompt", "required"),
    ("completions", {"prompt": [1, 2, 49152]}, "prompt", "outside the vocabulary"),
    ("completions", {"prompt": "x" * 5000}, "prompt", "more than the context limit 1024"),
    ("completions", {"model": None}, "model", "model is required"),
    ("completions", {"temperature": "hot"}, "temperature", "must be a number"),
    ("completions", {"echo": True}, "echo", "not supported"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objekt"}}}}, "response_format.json_schema.schema",
     "cannot be compiled"),
    ("chat", {"response_format": {"type": "xml"}}, "response_format.type", "not one of"),
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
]


@pytest.mark.parametrize("endpoint,fields,param,words", BAD,
                         ids=[f"{b[0]}-{'-'.join(b[1])}" for b in BAD])
def test_bad_field_is_400_naming_it(server, base_id, endpoint, fields, param, words):
    body = {"model": base_id, "max_tokens": 4}
    body.update({"prompt": PROMPT} if endpoint == "completions" else {"messages": CHAT})
    body.update(fields)
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    status, _, text = raw(server, path, body)
    assert status == 400, text
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"
    good = {"model": base_id, "max_tokens": 2, "temperature": 0,
            **({"prompt": PROMPT} if endpoint == "completions" else {"messages": CHAT})}
    ok, _, _ = raw(server, path, good)
    assert ok == 200  # and the server keeps serving


def test_bad_json_unknown_model_and_path(server, client, base_id):
    req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/v1/completions",
                                 data=b"{not json", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400 and "not valid JSON" in err.value.read().decode()
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)
    assert nf.value.body["param"] == "model" and nf.value.body["code"] == "model_not_found"
    assert "no-such-adapter" in nf.value.body["message"]
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    conn.putrequest("POST", "/v1/completions")  # a body over --max-message-size (4MiB):
    conn.putheader("Content-Type", "application/json")  # refused before it is read
    conn.putheader("Content-Length", str(5 << 20))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "max-message-size" in json.loads(resp.read())["error"][
        "message"]
    conn.close()
    status, _, text = raw(server, "/v1/nothing-here")
    assert status == 404 and json.loads(text)["error"]["type"] == "not_found_error"


def _running(server) -> float:
    return metric(server.metrics_port, "switchboard_requests_running")


def test_disconnect_mid_stream_frees_the_row(server, client, base_id):
    before = metric(server.metrics_port, "switchboard_step_tokens_sum")
    cancelled = metric(server.metrics_port, "switchboard_requests_total", code="CANCELLED")
    stream = client.chat.completions.create(
        model=base_id, messages=CHAT, max_tokens=900, temperature=0, stream=True,
        extra_body={"ignore_eos": True})
    it = iter(stream)
    for _ in range(4):
        next(it)
    assert _running(server) == 1
    stream.close()
    wait_for(lambda: _running(server) == 0, timeout=30)
    wait_for(lambda: metric(server.metrics_port, "switchboard_requests_total",
                            code="CANCELLED") == cancelled + 1, timeout=30)
    processed = metric(server.metrics_port, "switchboard_step_tokens_sum") - before
    assert processed < 900  # cut short: the engine stopped generating for it


def test_disconnect_while_waiting_for_a_unary_answer_frees_the_row(server, base_id):
    cancelled = metric(server.metrics_port, "switchboard_requests_total", code="CANCELLED")
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({
        "model": base_id, "prompt": PROMPT, "max_tokens": 900, "temperature": 0,
        "ignore_eos": True}), {"Content-Type": "application/json"})
    wait_for(lambda: _running(server) == 1, timeout=30)
    conn.close()  # before any answer
    wait_for(lambda: _running(server) == 0, timeout=30)
    wait_for(lambda: metric(server.metrics_port, "switchboard_requests_total",
                            code="CANCELLED") == cancelled + 1, timeout=30)


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "n"],
          "properties": {"color": {"enum": ["red", "green", "blue"]},
                         "n": {"type": "integer", "minimum": 0, "maximum": 9}}}


@pytest.mark.parametrize("temperature", [0, 1])
def test_response_format_constrains_http_answers(client, base_id, temperature):
    """response_format over HTTP reaches the same grammar as gRPC's field: the random tiny
    model's answers parse and validate, greedy and sampled; json_object gives an object."""
    import jsonschema

    r = client.chat.completions.create(
        model=base_id, messages=CHAT, max_tokens=60, temperature=temperature, seed=3,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "pick", "schema": SCHEMA}})
    assert r.choices[0].finish_reason == "stop", r
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = client.completions.create(model=base_id, prompt=PROMPT, max_tokens=60,
                                  temperature=temperature, seed=4,
                                  extra_body={"response_format": {"type": "json_object"}})
    if r.choices[0].finish_reason == "stop":  # an object may outgrow 60 tokens
        assert isinstance(json.loads(r.choices[0].text), dict)
    else:
        assert r.choices[0].text.lstrip().startswith("{")
