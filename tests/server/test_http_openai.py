"""OpenAI bodies -> GenerateRequests and `response_format` parsing (server/api/openai.py),
without a server: the field mapping, `n` and prompt batches, and the 400s that name the
field. The values' limits are the converter's, checked end to end in test_http_api.py."""

from __future__ import annotations

import json

import grpc
import pytest

from server.api.openai import HttpError, http_error, parse_request, response_format_spec


def _parse(chat: bool = False, **body):
    body.setdefault("model", "m")
    body.setdefault("messages" if chat else "prompt", [{"role": "user", "content": "hi"}]
                    if chat else "hi")
    return parse_request(body, chat=chat, max_choices=8)


def test_fields_map_to_the_generate_request():
    p = _parse(prompt=["a", "b"], n=2, max_tokens=7, temperature=0.5, top_p=0.9, seed=3,
               stop="x", presence_penalty=0.25, frequency_penalty=-0.5, logprobs=2,
               top_k=4, repetition_penalty=1.1, ignore_eos=True, user="someone")
    assert [r.prompt for r in p.requests] == ["a", "a", "b", "b"] and p.prompts == 2
    r = p.requests[0]
    assert (r.stopping.max_new_tokens, list(r.stopping.stop_sequences),
            r.stopping.ignore_eos) == (7, ["x"], True)
    s = r.sampling
    assert (s.temperature, s.top_p, s.seed, s.top_k) == pytest.approx((0.5, 0.9, 3, 4))
    assert (s.presence_penalty, s.frequency_penalty) == (0.25, -0.5)
    assert s.repetition_penalty == pytest.approx(1.1)
    assert (r.response.logprobs, r.response.top_logprobs) == (True, 2)
    assert len({r.request_id for r in p.requests}) == 4


def test_defaults_are_openai_s():
    r = _parse().requests[0]
    assert r.sampling.temperature == 1.0  # OpenAI samples by default
    assert r.stopping.max_new_tokens == 0  # the server's default
    assert not r.response.logprobs and r.response.top_logprobs == 0


def test_chat_messages_parts_and_developer_role():
    p = _parse(chat=True, messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                     "text": "b"}]},
        {"role": "assistant", "content": None}], logprobs=True, top_logprobs=3,
        max_completion_tokens=5)
    msgs = p.requests[0].messages.messages
    assert [(m.role, m.content) for m in msgs] == [("system", "be brief"), ("user", "ab"),
                                                    ("assistant", "")]
    assert p.requests[0].response.top_logprobs == 3 and p.logprobs == 3
    assert p.requests[0].stopping.max_new_tokens == 5


def test_token_id_prompts():
    assert list(_parse(prompt=[1, 2, 3]).requests[0].token_ids.ids) == [1, 2, 3]
    p = _parse(prompt=[[1, 2], [3]])
    assert [list(r.token_ids.ids) for r in p.requests] == [[1, 2], [3]]


@pytest.mark.parametrize("body,param", [
    ({"n": 9}, "n"),
    ({"prompt": ["a", "b", "c"], "n": 3}, "n"),
    ({"seed": -1}, "seed"),
    ({"max_tokens": 1 << 40}, "max_tokens"),
    ({"top_p": 0}, "top_p"),
    ({"prompt": [[1], []]}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"stream": "yes"}, "stream"),
    ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "x"}, "suffix"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
])
def test_bad_fields_name_themselves(body, param):
    with pytest.raises(HttpError) as err:
        _parse(**body)
    assert err.value.status == 400 and err.value.param == param


def test_chat_content_must_be_text():
    with pytest.raises(HttpError) as err:
        _parse(chat=True, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}])
    assert err.value.param == "messages[0].content[0]"


def test_response_format_spec():
    assert response_format_spec({}) is None
    assert response_format_spec({"response_format": {"type": "text"}}) is None
    kind, text = response_format_spec({"response_format": {"type": "json_object"}})
    assert kind == "json_object" and json.loads(text) == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"]}
    kind, text = response_format_spec({"response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}})
    assert kind == "json_schema" and json.loads(text) == schema
    for bad, param in (({"type": "xml"}, "response_format.type"),
                       ("json", "response_format"),
                       ({"type": "json_schema"}, "response_format.json_schema"),
                       ({"type": "json_schema", "json_schema": {"name": "x"}},
                        "response_format.json_schema.schema")):
        with pytest.raises(HttpError) as err:
            response_format_spec({"response_format": bad})
        assert err.value.param == param


def test_converter_messages_get_the_http_names():
    names = _parse(chat=True).names
    e = http_error(grpc.StatusCode.INVALID_ARGUMENT, "input has 900 tokens and "
                   "stopping.max_new_tokens is 200: together 1100, more than the context "
                   "limit 1024", names)
    assert e.message.startswith("messages has 900 tokens and max_tokens is 200")
    assert e.param == "messages"
    e = http_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full", names,
                   retry_after_ms=2500)
    assert e.status == 429 and e.headers["Retry-After"] == "3"
    assert http_error(grpc.StatusCode.UNAVAILABLE, "draining").status == 503
