"""A real Prometheus scrapes a real server: after N requests, PromQL over Prometheus' HTTP
API returns N and histogram quantiles, every dashboard query evaluates, and the live
exposition passes `promtool check metrics`."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from .conftest import require_binary
from .test_prometheus_config import dashboard_exprs

N_UNARY, N_STREAM, N_NOT_FOUND = 6, 3, 2
N = N_UNARY + N_STREAM + N_NOT_FOUND


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


class Prometheus:
    """`prometheus` on loopback scraping `targets` every second, storage in `workdir`."""

    def __init__(self, binary: str, workdir: Path, targets: list[str]) -> None:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "switchboard", "static_configs": [{"targets": targets}]}
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.poll(lambda: self._ready(), "Prometheus ready", timeout=60)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(
                "prometheus exited:\n" + (self.workdir / "prometheus.log").read_text()
            )
        try:
            return http_get(self.url + "/-/ready", timeout=2).startswith(b"Prometheus")
        except OSError:
            return False

    def query(self, promql: str) -> list[dict]:
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        body = json.loads(http_get(url))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def poll(self, predicate, what: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus_factory(tmp_path):
    binary = require_binary("prometheus")
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        p = Prometheus(binary, tmp_path, targets)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def send_traffic(target: str) -> None:
    from clients import SwitchboardClient
    from clients.errors import SwitchboardError

    with SwitchboardClient(target) as client:
        for i in range(N_UNARY):
            result = client.generate(f"Hello {i}", max_new_tokens=4, timeout=60)
            assert result.completion_tokens >= 1
        for i in range(N_STREAM):
            chunks = list(client.generate_stream(f"Stream {i}", max_new_tokens=4, timeout=60))
            assert chunks[-1].finish_reason
        for _ in range(N_NOT_FOUND):
            with pytest.raises(SwitchboardError) as err:
                client.generate("x", adapter_id="no-such-adapter", max_new_tokens=2, timeout=30)
            assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_prometheus_scrapes_the_server(tiny_model, start_server, prometheus_factory, tmp_path):
    promtool = require_binary("promtool")
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    server = start_server(
        "--base-model", tiny_model, "--adapter-dir", adapters, "--metrics-port", "0",
        "--max-seq-len", "256",
    )  # fmt: skip
    assert server.metrics_port > 0, "".join(server.lines)
    prom = prometheus_factory([f"127.0.0.1:{server.metrics_port}"])
    prom.poll(lambda: prom.scalar('up{job="switchboard"}') == 1.0, "the target to be up")

    send_traffic(server.target)

    prom.poll(
        lambda: prom.scalar("sum(switchboard_requests_total)") == N,
        f"sum(switchboard_requests_total) == {N}",
    )
    by_code = {
        r["metric"]["code"]: float(r["value"][1])
        for r in prom.query("sum by (code) (switchboard_requests_total)")
    }
    assert by_code == {"OK": N_UNARY + N_STREAM, "NOT_FOUND": N_NOT_FOUND}
    adapters_seen = {
        r["metric"]["adapter"] for r in prom.query("sum by (adapter) (switchboard_requests_total)")
    }
    assert "__base__" in adapters_seen

    def p50() -> float | None:
        value = prom.scalar(
            "histogram_quantile(0.5, sum by (le) "
            "(rate(switchboard_request_duration_seconds_bucket[1m])))"
        )
        return value if value is not None and not math.isnan(value) else None

    assert prom.poll(p50, "a p50 request duration") > 0
    ttft = prom.scalar(
        "histogram_quantile(0.9, sum by (le) (switchboard_time_to_first_token_seconds_bucket))"
    )
    assert ttft is not None and ttft > 0
    assert prom.scalar("sum(switchboard_generated_tokens_total)") >= N_UNARY + N_STREAM
    assert prom.scalar("sum(switchboard_step_tokens_count)") > 0

    # Every dashboard query is valid against this Prometheus.
    for _title, expr in dashboard_exprs():
        prom.query(expr)  # asserts status == success

    # The live exposition passes promtool's lint.
    body = http_get(f"http://127.0.0.1:{server.metrics_port}/metrics")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
