"""The metrics tell the truth: each case is provoked against a real server process and
read back from its /metrics scrape. A cancelled stream is CANCELLED with no TTFT or
queue-wait observation; a deadline observes its real latency; refusals (interceptor, full
queue) observe none and are counted with their cause; full KV rows read 1; the adapters
running and waiting, the slots, finish reasons, prefill and decode time are exported;
memory follows adapter loads; a draining server counts the calls it refuses."""

from __future__ import annotations

import signal
import threading
import urllib.request

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support import ServerProcess, make_lora, make_tiny_model, wait_for

from server.security.keys import hash_key
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

FULL, LIMITED = "full-key-0123456789", "limited-key-0123456789"
LONG = 6000  # tokens: a stream that runs until the test cancels it


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model"), max_positions=8192)


@pytest.fixture(scope="module")
def adapter_root(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_lora(model, root / "a", r=4, targets=["q_proj"], seed=1)
    make_lora(model, root / "b", r=4, targets=["v_proj"], seed=2)
    make_lora(model, root / "incoming" / "c", r=8, targets=["q_proj", "o_proj"], seed=3)
    return root


@pytest.fixture(scope="module")
def server(model, adapter_root, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [
        {"name": "full", "hash": hash_key(FULL), "adapters": ["*"], "admin": True,
         "max_concurrent": 32},
        {"name": "limited", "hash": hash_key(LIMITED), "adapters": ["a"], "max_concurrent": 1},
    ]}))
    s = ServerProcess(["--base-model", model, "--adapter-dir", adapter_root,
                       "--api-keys", keys, "--metrics-port", "0", "--enable-admin",
                       "--max-batch-size", "2", "--max-queue", "2", "--max-active-adapters", "1",
                       "--max-seq-len", "8192", "--max-new-tokens", str(LONG),
                       "--kv-cache-memory", "64MiB", "--grace-period", "30"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.TextGenerationStub(channel), pb_grpc.AdapterAdminStub(channel)
    channel.close()


def md(key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key else ()


def request(adapter: str = "", n: int = 5) -> pb.GenerateRequest:
    return pb.GenerateRequest(adapter_id=adapter, prompt="The weather today",
                              stopping=pb.StoppingCriteria(max_new_tokens=n, ignore_eos=True))


class Scrape:
    """One /metrics scrape; `v(name, **labels)` sums the matching samples."""

    def __init__(self, port: int) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def v(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == x for k, x in labels.items()))

    def labels(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.v(name, **labels) - before.v(name, **labels)


def idle(server) -> Scrape:
    """A scrape once nothing runs or waits (what earlier tests started has ended)."""
    def check():
        s = Scrape(server.metrics_port)
        busy = s.v("switchboard_requests_running") + s.v("switchboard_requests_waiting")
        return s if busy == 0 else None
    return wait_for(check, timeout=60)


def settled(server, predicate) -> Scrape:
    """The first scrape for which `predicate` holds."""
    def check():
        s = Scrape(server.metrics_port)
        return s if predicate(s) else None
    return wait_for(check, timeout=60)


class LongStream:
    """A stream generating until cancelled; `started` once its first message arrived."""

    def __init__(self, stub, key: str = FULL, adapter: str = "") -> None:
        self.call = stub.GenerateStream(request(adapter, LONG), metadata=md(key), timeout=120)
        self.started = threading.Event()
        self.code: grpc.StatusCode | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for _ in self.call:
                self.started.set()
        except grpc.RpcError as e:
            self.code = e.code()
        self.started.set()

    def cancel(self) -> None:
        self.call.cancel()


TTFT = "switchboard_time_to_first_token_seconds_count"
QUEUE = "switchboard_queue_wait_seconds_count"
E2E = "switchboard_request_duration_seconds_count"
E2E_SUM = "switchboard_request_duration_seconds_sum"
REQUESTS = "switchboard_requests_total"
EXHAUSTED = "switchboard_resource_exhausted_total"
REJECTED = "switchboard_rejected_calls_total"


def test_a_finished_request_observes_its_phases_and_finish_reason(server, stub):
    gen, _ = stub
    before = idle(server)
    r = gen.Generate(request(n=5), metadata=md(FULL), timeout=60)
    assert r.finish_reason == pb.FINISH_REASON_LENGTH
    after = settled(server, lambda s: delta(before, s, E2E) == 1)
    assert delta(before, after, "switchboard_requests_finished_total",
                 finish_reason="length") == 1
    assert delta(before, after, REQUESTS, code="OK") == 1
    for name in (TTFT, QUEUE, "switchboard_request_prefill_seconds_count",
                 "switchboard_request_decode_seconds_count"):
        assert delta(before, after, name) == 1, name
    prefill = delta(before, after, "switchboard_request_prefill_seconds_sum")
    decode = delta(before, after, "switchboard_request_decode_seconds_sum")
    assert prefill > 0 and decode > 0
    # the phases add up to the end-to-end time (queue + prefill + decode = total)
    e2e = delta(before, after, E2E_SUM)
    queue = delta(before, after, "switchboard_queue_wait_seconds_sum")
    assert queue + prefill + decode == pytest.approx(e2e, rel=1e-6, abs=1e-6)


def test_a_cancelled_stream_counts_as_cancelled_without_ttft_or_queue_wait(server, stub):
    gen, _ = stub
    before = idle(server)
    call = gen.GenerateStream(request(n=LONG), metadata=md(FULL), timeout=120)
    got = [next(call), next(call)]
    call.cancel()
    assert len(got) == 2
    after = settled(server, lambda s: delta(before, s, REQUESTS, code="CANCELLED") == 1)
    assert delta(before, after, REQUESTS, code="OK") == 0
    assert delta(before, after, TTFT) == 0
    assert delta(before, after, QUEUE) == 0
    assert delta(before, after, E2E) == 1
    assert delta(before, after, E2E_SUM) > 0  # its real duration, not 0 s
    assert delta(before, after, "switchboard_requests_finished_total",
                 finish_reason="cancelled") == 1
    assert delta(before, after, "switchboard_generated_tokens_total") >= 2


def test_a_deadline_is_counted_with_its_real_latency(server, stub):
    gen, _ = stub
    before = idle(server)
    with pytest.raises(grpc.RpcError) as e:
        gen.Generate(request(n=LONG), metadata=md(FULL), timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    after = settled(server, lambda s: delta(before, s, REQUESTS, code="DEADLINE_EXCEEDED") == 1)
    assert delta(before, after, REQUESTS, code="CANCELLED") == 0
    assert delta(before, after, E2E) == 1
    assert delta(before, after, E2E_SUM) >= 0.4  # at least most of the 0.5 s it was given
    assert delta(before, after, TTFT) == 0


def test_interceptor_refusals_are_counted_and_observe_no_latency(server, stub):
    gen, admin = stub
    before = idle(server)
    cases = [
        (lambda: gen.Generate(request(), timeout=30), grpc.StatusCode.UNAUTHENTICATED),
        (lambda: gen.Generate(request(), metadata=md("wrong-key"), timeout=30),
         grpc.StatusCode.UNAUTHENTICATED),
        (lambda: gen.Generate(request("b"), metadata=md(LIMITED), timeout=30),
         grpc.StatusCode.PERMISSION_DENIED),
        (lambda: admin.ListAdapters(pb.ListAdaptersRequest(), metadata=md(LIMITED), timeout=30),
         grpc.StatusCode.PERMISSION_DENIED),
    ]
    for call, code in cases:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == code
    # the limited key's one concurrent call is taken by a running stream
    stream = LongStream(gen, LIMITED, "a")
    assert stream.started.wait(60) and stream.code is None
    with pytest.raises(grpc.RpcError) as e:
        gen.Generate(request("a"), metadata=md(LIMITED), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    after = Scrape(server.metrics_port)
    stream.cancel()
    assert delta(before, after, REQUESTS, code="UNAUTHENTICATED") == 2
    assert delta(before, after, REQUESTS, code="PERMISSION_DENIED") == 1  # generation only
    assert delta(before, after, REQUESTS, code="RESOURCE_EXHAUSTED") == 1
    assert delta(before, after, REJECTED, service="TextGeneration", code="UNAUTHENTICATED") == 2
    assert delta(before, after, REJECTED, service="TextGeneration",
                 code="PERMISSION_DENIED") == 1
    assert delta(before, after, REJECTED, service="AdapterAdmin", code="PERMISSION_DENIED") == 1
    assert delta(before, after, EXHAUSTED, cause="key_concurrency") == 1
    assert delta(before, after, EXHAUSTED) == 1
    assert delta(before, after, E2E) == 0  # no 0 s latency for any refusal


def test_a_full_queue_is_its_own_cause_and_full_rows_read_one(server, stub):
    gen, _ = stub
    before = idle(server)
    assert before.v("switchboard_kv_cache_usage_ratio") == 0
    streams = []
    for running, waiting in ((1, 0), (2, 0), (2, 1), (2, 2)):  # 2 rows, --max-queue 2
        streams.append(LongStream(gen))
        full = settled(server, lambda s, r=running, w=waiting:
                       (s.v("switchboard_requests_running"),
                        s.v("switchboard_requests_waiting")) == (r, w))
    try:
        assert full.v("switchboard_kv_cache_usage_ratio") == 1.0
        tokens = full.v("switchboard_kv_cache_tokens_ratio")
        assert 0 < tokens < 1  # the rows are taken, not filled
        with pytest.raises(grpc.RpcError) as e:
            gen.Generate(request(), metadata=md(FULL), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        after = Scrape(server.metrics_port)
    finally:
        for s in streams:
            s.cancel()
    assert delta(before, after, EXHAUSTED, cause="queue_full") == 1
    assert delta(before, after, EXHAUSTED) == 1
    assert delta(before, after, REQUESTS, code="RESOURCE_EXHAUSTED") == 1
    assert delta(before, after, E2E) == 0
    assert idle(server).v("switchboard_kv_cache_usage_ratio") == 0


def test_adapters_running_waiting_and_slots_and_a_slot_timeout(server, stub):
    gen, _ = stub
    before = idle(server)
    assert before.v("switchboard_adapter_slots") == 1
    running = LongStream(gen, FULL, "a")  # pins the one device slot
    assert running.started.wait(60) and running.code is None
    waiting = LongStream(gen, FULL, "b")  # waits for that slot
    try:
        during = settled(server, lambda s: s.v("switchboard_adapters_waiting") == 1)
        assert during.v("switchboard_adapters_running") == 1
        (info,) = during.labels("switchboard_lora_requests_info")
        assert info == {"running_lora_adapters": "a", "waiting_lora_adapters": "b",
                        "max_lora": "1"}
        waiting.cancel()
        with pytest.raises(grpc.RpcError):  # no slot comes free within its deadline
            gen.Generate(request("b"), metadata=md(FULL), timeout=1.0)
        after = settled(server, lambda s: delta(before, s, EXHAUSTED, cause="adapter_slots"))
    finally:
        running.cancel()
        waiting.cancel()
    assert delta(before, after, EXHAUSTED, cause="adapter_slots") == 1
    assert delta(before, after, REQUESTS, code="RESOURCE_EXHAUSTED") == 1
    idle(server)
    (info,) = Scrape(server.metrics_port).labels("switchboard_lora_requests_info")
    assert info == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "1"}


def test_memory_follows_adapter_loads_and_unloads(server, stub):
    _, admin = stub
    part = {"part": "adapters_host"}
    before = Scrape(server.metrics_port).v("switchboard_memory_bytes", **part)
    r = admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="c", path="incoming/c"),
                          metadata=md(FULL), timeout=60)
    loaded = Scrape(server.metrics_port).v("switchboard_memory_bytes", **part)
    assert loaded - before >= r.adapter.size_bytes > 0
    admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="c"), metadata=md(FULL), timeout=60)
    assert Scrape(server.metrics_port).v("switchboard_memory_bytes", **part) == before


def test_a_draining_server_counts_the_calls_it_refuses(server, stub):
    """Last in this module: it stops the server."""
    gen, _ = stub
    before = idle(server)
    stream = LongStream(gen)  # keeps the drain waiting
    assert stream.started.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    code = wait_for(lambda: _code_of(gen), timeout=30)
    assert code == grpc.StatusCode.UNAVAILABLE
    after = Scrape(server.metrics_port)
    stream.cancel()
    assert delta(before, after, REJECTED, service="TextGeneration", code="UNAVAILABLE") >= 1
    assert delta(before, after, REQUESTS, code="UNAVAILABLE") >= 1


def _code_of(gen) -> grpc.StatusCode | None:
    """The code of a small call, or None while the server still serves it."""
    try:
        gen.Generate(request(), metadata=md(FULL), timeout=30)
    except grpc.RpcError as e:
        return e.code()
    return None
