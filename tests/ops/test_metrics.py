"""ServerMetrics: bounded adapter labels, and observations visible in the exposition."""

from __future__ import annotations

import subprocess
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import BASE_LABEL, OTHER_LABEL, AdapterLabeler, ServerMetrics


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def samples(metrics: ServerMetrics) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} from the text exposition, as a scraper parses it."""
    text = metrics.exposition().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def adapter_series(metrics: ServerMetrics, name: str) -> dict[str, float]:
    return {
        dict(labels)["adapter"]: value
        for (sample, labels), value in samples(metrics).items()
        if sample == name
    }


def finish(metrics: ServerMetrics, adapter_id: str, code: str = "OK", n: int = 1) -> None:
    for _ in range(n):
        metrics.request_started(adapter_id)
        metrics.request_finished(adapter_id, code, 0.5, 0.05, 0.01, 12, 7)


# -- labels -------------------------------------------------------------------------------


def test_base_model_and_first_adapters_get_own_labels_rest_share_other():
    m = ServerMetrics(max_adapter_labels=2)
    assert m.adapter_label("") == BASE_LABEL
    for a in ["a", "b", "c", "d"]:
        finish(m, a)
    finish(m, "")
    assert m.labelled_adapters() == {"a", "b"}
    assert m.adapter_label("c") == OTHER_LABEL
    assert adapter_series(m, "switchboard_requests_total") == {
        "a": 1.0,
        "b": 1.0,
        OTHER_LABEL: 2.0,
        BASE_LABEL: 1.0,
    }


def test_reserved_names_never_get_a_label_of_their_own():
    m = ServerMetrics(max_adapter_labels=4)
    assert m.adapter_label(OTHER_LABEL) == OTHER_LABEL
    assert m.adapter_label(BASE_LABEL) == OTHER_LABEL
    assert m.labelled_adapters() == frozenset()


def test_requests_refused_before_start_do_not_take_labels():
    m = ServerMetrics(max_adapter_labels=4)
    for i in range(10):
        m.request_finished(f"made-up-{i}", "NOT_FOUND", 0.0, None, None, 0, 0)
    m.request_finished("", "INVALID_ARGUMENT", 0.0, None, None, 0, 0)
    assert m.labelled_adapters() == frozenset()
    assert adapter_series(m, "switchboard_requests_total") == {OTHER_LABEL: 10.0, BASE_LABEL: 1.0}


def test_zero_labels_puts_every_adapter_in_other():
    m = ServerMetrics(max_adapter_labels=0)
    finish(m, "a", n=3)
    assert adapter_series(m, "switchboard_requests_total") == {OTHER_LABEL: 3.0}


def test_busy_adapter_takes_the_label_of_the_quietest_and_its_series_go():
    m = ServerMetrics(max_adapter_labels=2)
    finish(m, "a", n=5)
    finish(m, "b", n=1)
    finish(m, "hot", n=2)  # 2 is not > 2 x 1 (hysteresis): stays in __other__
    assert m.labelled_adapters() == {"a", "b"}
    finish(m, "hot", n=1)  # 3 > 2 x 1: takes b's label
    assert m.labelled_adapters() == {"a", "hot"}
    series = adapter_series(m, "switchboard_requests_total")
    assert "b" not in series
    assert "b" not in adapter_series(m, "switchboard_prompt_tokens_total")
    assert series["a"] == 5.0
    assert series[OTHER_LABEL] == 2.0  # hot's requests before it had a label
    assert series["hot"] == 1.0  # the one that promoted it
    finish(m, "b")
    assert adapter_series(m, "switchboard_requests_total")[OTHER_LABEL] == 3.0


def test_traffic_decays_so_yesterdays_adapters_give_way():
    clock = FakeClock()
    m = ServerMetrics(max_adapter_labels=1, label_half_life_s=60.0, clock=clock)
    finish(m, "old", n=100)
    clock.now += 60.0 * 10  # 10 half-lives: old's 100 -> ~0.1
    finish(m, "new", n=1)
    assert m.labelled_adapters() == {"new"}


def test_a_flood_of_distinct_adapters_keeps_labels_and_memory_bounded():
    labeler = AdapterLabeler(4, max_tracked=16)
    for i in range(5000):
        labeler.record(f"noise-{i}")
        if i % 3 == 0:
            labeler.record("heavy")
    assert len(labeler.labelled) == 4
    assert "heavy" in labeler.labelled
    assert len(labeler._candidates) <= 16

    m = ServerMetrics(max_adapter_labels=8)
    for i in range(1000):
        finish(m, f"adapter-{i}")
    assert len(adapter_series(m, "switchboard_requests_total")) <= 8 + 1


def test_forget_adapter_frees_its_label():
    m = ServerMetrics(max_adapter_labels=1)
    finish(m, "a")
    m.forget_adapter("a")
    assert "a" not in adapter_series(m, "switchboard_requests_total")
    finish(m, "b")
    assert m.labelled_adapters() == {"b"}


def test_labeler_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_adapter_labels must be >= 0, got -1"):
        AdapterLabeler(-1)
    with pytest.raises(ValueError, match="hysteresis"):
        AdapterLabeler(1, hysteresis=0.5)


# -- observations ---------------------------------------------------------------------------


def test_every_observation_shows_up_in_the_exposition():
    m = ServerMetrics()
    m.request_started("a")
    m.request_finished("a", "OK", 2.0, 0.2, 0.03, 100, 20)
    m.request_started("")
    m.request_finished("", "not_found", 0.001, None, None, 0, 0)
    m.request_finished("", "SOMETHING_ELSE", 0.001, None, None, 0, 0)
    m.observe_inter_token(0.02)
    m.observe_step(batch_size=8, tokens=300, seconds=0.04)
    m.set_requests(running=3, waiting=5)
    m.set_kv_cache_usage(0.25)
    m.adapter_loaded("device", 0.05)
    m.adapter_loaded("host", 0.5)
    m.adapter_evicted("device")
    m.set_resident_adapters("device", 4)
    m.set_memory("base_model", 270_000_000)
    m.set_info("0.1.0", "smollm2-135m-instruct", "float32", "cpu", "none")
    s = samples(m)

    def value(name: str, **labels: str) -> float:
        return s[(name, frozenset(labels.items()))]

    assert value("switchboard_requests_total", adapter="a", code="OK") == 1
    assert value("switchboard_requests_total", adapter=BASE_LABEL, code="NOT_FOUND") == 1
    assert value("switchboard_requests_total", adapter=BASE_LABEL, code="UNKNOWN") == 1
    assert value("switchboard_prompt_tokens_total", adapter="a") == 100
    assert value("switchboard_generated_tokens_total", adapter="a") == 20
    assert value("switchboard_request_duration_seconds_count") == 3
    assert value("switchboard_request_duration_seconds_sum") == pytest.approx(2.002)
    assert value("switchboard_time_to_first_token_seconds_count") == 1
    assert value("switchboard_time_to_first_token_seconds_bucket", le="0.25") == 1
    assert value("switchboard_time_to_first_token_seconds_bucket", le="0.15") == 0
    assert value("switchboard_queue_wait_seconds_sum") == pytest.approx(0.03)
    assert value("switchboard_inter_token_latency_seconds_bucket", le="0.02") == 1
    assert value("switchboard_batch_size_bucket", le="8.0") == 1
    assert value("switchboard_step_tokens_sum") == 300
    assert value("switchboard_step_duration_seconds_count") == 1
    assert value("switchboard_requests_running") == 3
    assert value("switchboard_requests_waiting") == 5
    assert value("switchboard_kv_cache_usage_ratio") == 0.25
    assert value("switchboard_adapter_loads_total", tier="device") == 1
    assert value("switchboard_adapter_load_duration_seconds_sum", tier="host") == 0.5
    assert value("switchboard_adapter_evictions_total", tier="device") == 1
    assert value("switchboard_adapters_resident", tier="device") == 4
    assert value("switchboard_memory_bytes", part="base_model") == 270_000_000
    assert (
        value(
            "switchboard_build_info",
            version="0.1.0",
            model_id="smollm2-135m-instruct",
            dtype="float32",
            device="cpu",
            quantization="none",
        )
        == 1
    )
    assert not any(name.endswith("_created") for name, _ in s)


def test_the_memory_source_given_at_construction_is_read_at_each_scrape():
    parts = {"base_model": 100, "adapters_host": 0}
    broken = []

    def source() -> dict[str, int]:
        if broken:
            raise RuntimeError("engine gone")
        return dict(parts)

    m = ServerMetrics(memory_source=source)
    assert samples(m)[("switchboard_memory_bytes", frozenset({("part", "adapters_host")}))] == 0
    parts["adapters_host"] = 4096  # an adapter loaded: the next scrape shows it
    assert samples(m)[("switchboard_memory_bytes", frozenset({("part", "adapters_host")}))] == 4096
    broken.append(True)  # a failing source keeps the last values; the scrape still answers
    s = samples(m)
    assert s[("switchboard_memory_bytes", frozenset({("part", "base_model")}))] == 100
    assert s[("switchboard_memory_bytes", frozenset({("part", "adapters_host")}))] == 4096


def test_buckets_cover_llm_serving_ranges():
    m = ServerMetrics()
    assert m.time_to_first_token._upper_bounds[0] == 0.005
    assert m.time_to_first_token._upper_bounds[-2] == 60.0
    assert m.inter_token_latency._upper_bounds[0] == 0.001
    assert m.inter_token_latency._upper_bounds[-2] == 5.0
    assert m.request_duration._upper_bounds[-2] == 300.0


def test_registries_are_independent():
    a, b = ServerMetrics(), ServerMetrics()
    finish(a, "x")
    assert adapter_series(a, "switchboard_requests_total") == {"x": 1.0}
    assert adapter_series(b, "switchboard_requests_total") == {}


def test_concurrent_requests_are_all_counted():
    m = ServerMetrics(max_adapter_labels=3)

    def worker(k: int) -> None:
        for i in range(200):
            finish(m, f"a{(k * 7 + i) % 6}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Series may have been removed by demotions, so count via the duration histogram.
    assert samples(m)[("switchboard_request_duration_seconds_count", frozenset())] == 800
    assert len(adapter_series(m, "switchboard_requests_total")) <= 3 + 1


def test_http_server_on_port_zero_serves_metrics():
    m = ServerMetrics()
    port = m.start_http_server("127.0.0.1", 0)
    try:
        assert port > 0 and m.port == port
        finish(m, "a")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            body = r.read().decode()
        assert 'switchboard_requests_total{adapter="a",code="OK"} 1.0' in body
        with pytest.raises(RuntimeError, match="already running"):
            m.start_http_server("127.0.0.1", 0)
    finally:
        m.stop_http_server()
    assert m.port is None


def test_promtool_check_metrics_passes_on_the_exposition(promtool):
    m = ServerMetrics(max_adapter_labels=2)
    for a in ["", "a", "b", "c"]:
        finish(m, a)
    finish(m, "a", code="RESOURCE_EXHAUSTED")
    m.observe_inter_token(0.01)
    m.observe_step(2, 2, 0.01)
    m.set_requests(1, 0)
    m.set_kv_cache_usage(0.1)
    m.adapter_loaded("disk", 0.2)
    m.adapter_evicted("host")
    m.set_resident_adapters("host", 1)
    m.set_memory("adapters", 1024)
    m.set_info("0.1.0", "m", "float32", "cpu", "none")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=m.exposition(), capture_output=True, timeout=60
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
