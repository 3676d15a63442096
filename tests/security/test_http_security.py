"""The HTTP API under the gRPC API's policy: the same API keys as `Authorization: Bearer`
(401), the same per-adapter permissions (403), the same per-key concurrency shared with
gRPC and the same queue limit (429 with Retry-After), and the same drain (503)."""

from __future__ import annotations

import json
import signal
import threading

import grpc
import openai
import pytest
from security_support import bearer, code_of, small, write_keys
from support import ServerProcess, http_call, make_lora, metric, wait_for

from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

ALPHA, BETA = "sk-alpha-key", "sk-beta-key"


@pytest.fixture(scope="module")
def adapter_root(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_lora(tiny_model, root / "tenant-a", r=4, targets=["q_proj"], seed=1)
    make_lora(tiny_model, root / "other-b", r=4, targets=["v_proj"], seed=2)
    return root


@pytest.fixture(scope="module")
def server(tiny_model, adapter_root, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    write_keys(keys, [
        {"key": ALPHA, "name": "alpha", "adapters": ["tenant-*"], "max_concurrent": 1},
        {"key": BETA, "name": "beta", "adapters": ["other-*"], "base_model": False},
    ])
    s = ServerProcess(["--base-model", tiny_model, "--adapter-dir", adapter_root,
                       "--api-keys", keys, "--max-seq-len", "1024", "--kv-cache-memory", "32MiB",
                       "--max-new-tokens", "900", "--http-port", "0", "--metrics-port", "0",
                       "--retry-after-ms", "1500"])
    yield s
    s.stop()


def _client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url, api_key=key, max_retries=0)


def _complete(client, model: str, **kw):
    return client.completions.create(model=model, prompt="hello", max_tokens=2, **kw)


def test_missing_or_unknown_key_is_401(server, tiny_model):
    with pytest.raises(openai.AuthenticationError) as err:
        _complete(_client(server, "sk-wrong"), str(tiny_model))
    assert err.value.status_code == 401
    assert err.value.body["type"] == "authentication_error"
    assert "not recognised" in err.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        _client(server, "sk-wrong").models.list()
    for path, body in (("/v1/completions", {"model": str(tiny_model), "prompt": "x"}),
                       ("/v1/models", None)):  # no Authorization header at all
        status, text = _raw(server, path, body)
        assert status == 401 and "missing API key" in json.loads(text)["error"]["message"]
    assert _raw(server, "/health")[0] == 200  # probes need no key


def test_adapter_not_allowed_is_403_and_models_are_filtered(server, tiny_model):
    base = str(tiny_model)
    alpha, beta = _client(server, ALPHA), _client(server, BETA)
    assert {m.id for m in alpha.models.list().data} == {base, "tenant-a"}
    assert {m.id for m in beta.models.list().data} == {"other-b"}
    assert _complete(alpha, "tenant-a").choices[0].text is not None
    assert _complete(beta, "other-b").usage.completion_tokens == 2
    for client, model in ((alpha, "other-b"), (beta, "tenant-a"), (beta, base),
                          (beta, "no-such-thing")):  # no hint whether it exists
        with pytest.raises(openai.PermissionDeniedError) as err:
            _complete(client, model)
        assert err.value.status_code == 403 and "may not use" in err.value.body["message"]


def test_per_key_limit_is_429_with_retry_after_and_shared_with_grpc(server, tiny_model):
    alpha = _client(server, ALPHA)
    stream = alpha.completions.create(model=str(tiny_model), prompt="count", max_tokens=800,
                                      stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it)  # alpha's one slot is held by this stream
    try:
        with pytest.raises(openai.RateLimitError) as err:
            _complete(alpha, "tenant-a")
        assert err.value.status_code == 429
        assert err.value.response.headers["retry-after"] == "2"  # 1500 ms, rounded up
        assert err.value.response.headers["retry-after-ms"] == "1500"
        assert "max_concurrent" in err.value.body["message"]
        with grpc.insecure_channel(server.target) as ch:  # the same slot on gRPC
            stub = pb_grpc.TextGenerationStub(ch)
            assert code_of(stub.Generate, small(), metadata=bearer(ALPHA),
                           timeout=30) == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        stream.close()
    wait_for(lambda: metric(server.metrics_port, "switchboard_requests_running") == 0)
    wait_for(lambda: _ok(alpha, "tenant-a"), timeout=30)


def _ok(client, model: str) -> bool:
    try:
        _complete(client, model)
        return True
    except openai.RateLimitError:
        return False


def test_queue_full_is_429_and_drain_is_503(tiny_model, tmp_path):
    server = ServerProcess(["--base-model", tiny_model, "--adapter-dir", tmp_path,
                            "--max-seq-len", "1024", "--kv-cache-memory", "8MiB",
                            "--max-batch-size", "1", "--max-queue", "1",
                            "--max-new-tokens", "900", "--grace-period", "60",
                            "--http-port", "0", "--metrics-port", "0"])
    try:
        client = _client(server, "unused")  # no --api-keys: any key or none is served
        base = str(tiny_model)
        long = dict(model=base, prompt="count", max_tokens=300, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        running = client.completions.create(**long)
        next(iter(running))
        waiting = client.completions.create(**long)  # in the queue behind it
        wait_for(lambda: metric(server.metrics_port, "switchboard_requests_waiting") == 1)
        with pytest.raises(openai.RateLimitError) as err:
            _complete(client, base)
        assert err.value.response.headers["retry-after"] == "1"
        assert "queue is full" in err.value.body["message"]

        usage: dict[str, int] = {}
        readers = [threading.Thread(target=lambda name=name, s=s: usage.update(
            {name: [c for c in s][-1].usage.completion_tokens}))
            for name, s in (("running", running), ("waiting", waiting))]
        for r in readers:
            r.start()
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _status(server, "/health") == 503, timeout=10)
        with pytest.raises(openai.InternalServerError) as err:  # 503 is a 5xx for the SDK
            _complete(client, base)
        assert err.value.status_code == 503
        assert "shutting down" in err.value.body["message"]
        for r in readers:
            r.join(120)
        assert usage == {"running": 300, "waiting": 300}  # both ran to their end
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def _status(server, path: str) -> int:
    return _raw(server, path)[0]


def _raw(server, path: str, body: dict | None = None) -> tuple[int, str]:
    status, _, text = http_call(server, path, body, timeout=10)
    return status, text
