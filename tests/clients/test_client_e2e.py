"""The clients, CLI and load generator against real `switchboard serve` processes
(tiny random Llama from tests/conftest.py, so the text is gibberish but deterministic)."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from clients import cli, errors
from clients.aio import AsyncSwitchboardClient
from clients.client import SwitchboardClient
from clients.loadtest import LoadTestConfig, format_summary, run_loadtest
from clients.routing import rendezvous_order


@pytest.fixture
def server(start_server, tiny_model):
    return start_server("--base-model", tiny_model, "--enable-admin")


def test_sync_and_aio_clients(server):
    with SwitchboardClient(server.target, timeout=60) as client:
        assert client.health() == "SERVING"
        info = client.model_info()
        assert info.vocab_size == 49152 and info.max_new_tokens_limit > 0
        unary = client.generate("The capital of France is", max_new_tokens=12,
                                token_ids_out=True, logprobs=True, ignore_eos=True)
        assert unary.finish_reason == "length" and unary.completion_tokens == 12
        assert len(unary.token_ids) == len(unary.logprobs) == 12
        assert unary.endpoint == server.target
        chunks = list(client.generate_stream("The capital of France is", max_new_tokens=12,
                                             token_ids_out=True, ignore_eos=True))
        assert "".join(c.text for c in chunks) == unary.text
        assert [t for c in chunks for t in c.token_ids] == unary.token_ids
        assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 12
        chat = client.chat([{"role": "user", "content": "Hi"}], max_new_tokens=4)
        assert chat.completion_tokens <= 4 and chat.prompt_tokens > 1
        tok = client.tokenize("hello world")
        assert tok.token_ids and len(tok.token_ids) == len(tok.tokens)
        assert client.list_adapters() == []
        with pytest.raises(errors.NotFound):
            client.generate("x", adapter_id="no-such-adapter", max_new_tokens=2)
        with pytest.raises(errors.InvalidArgument, match="temperature"):
            client.generate("x", temperature=-1.0, max_new_tokens=2)
        with pytest.raises(errors.NotFound):
            list(client.generate_stream("x", adapter_id="no-such-adapter"))
        stream = client.generate_stream("x", max_new_tokens=200, ignore_eos=True)
        next(stream)
        stream.close()  # cancels on the server; the next call is served normally
        assert client.generate("The capital of France is", max_new_tokens=12,
                               token_ids_out=True, ignore_eos=True).token_ids == unary.token_ids

    async def aio_main():
        async with AsyncSwitchboardClient(server.target) as client:
            r = await client.generate("The capital of France is", max_new_tokens=12,
                                      token_ids_out=True, ignore_eos=True)
            text = "".join([c.text async for c in client.generate_stream(
                "The capital of France is", max_new_tokens=12, ignore_eos=True)])
            with pytest.raises(errors.NotFound):
                await client.generate("x", adapter_id="no-such-adapter")
            return r, text, await client.health()

    r, text, status = asyncio.run(aio_main())
    assert r.token_ids == unary.token_ids and text == unary.text and status == "SERVING"


def test_cli(server, capsys):
    base = ["--target", server.target]
    assert cli.main([*base, "generate", "Hello", "-n", "5", "--ignore-eos"]) == 0
    out, err = capsys.readouterr()
    assert "finish=length" in err and "completion_tokens=5" in err
    assert cli.main(["generate", "Hello", "-n", "5", "--ignore-eos", "--json", *base]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["completion_tokens"] == 5 and data["finish_reason"] == "length"
    assert cli.main([*base, "chat", "Hi", "-n", "4", "--stream"]) == 0
    assert "finish=" in capsys.readouterr().err
    assert cli.main([*base, "--json", "chat", "Hi", "-n", "3", "--stream"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[-1]["finish_reason"] in ("length", "eos")
    for command in (["health"], ["info"], ["adapters", "list"], ["tokenize", "a b"]):
        assert cli.main([*base, *command]) == 0, command
    assert server.target + ": SERVING" in capsys.readouterr().out
    assert cli.main([*base, "generate", "x", "-a", "nope"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: NOT_FOUND: ") and "\n" not in err
    assert cli.main([*base, "generate", "x", "--temperature", "-2"]) == 1
    assert capsys.readouterr().err.startswith("error: INVALID_ARGUMENT: ")


def test_loadtest_closed_and_open_loop(server, tmp_path, capsys):
    result = run_loadtest(LoadTestConfig(
        target=server.target, concurrency=3, num_requests=12, duration_s=None,
        max_new_tokens=8, ignore_eos=True, progress=False,
    ))
    assert result.requests_ok == 12 and result.requests_failed == 0
    assert result.output_tokens == 12 * 8
    assert result.ttft.count == 12 and result.itl.count == 12 * 7
    assert result.e2e.p50 is not None and result.ttft.p99 <= result.e2e.max
    assert "requests/s" in format_summary(result)

    out = tmp_path / "lt.json"
    plot = tmp_path / "lt.png"
    rc = cli.main(["--target", server.target, "loadtest", "--rate", "20", "--duration", "1",
                   "-n", "4", "--adapters", "base,nope", "--no-progress",
                   "-o", str(out), "--records", "--plot", str(plot)])
    assert rc == 0
    summary = capsys.readouterr().out
    assert "errors by status code: NOT_FOUND" in summary and "send lag" in summary
    data = json.loads(out.read_text())
    assert data["requests_ok"] + data["requests_failed"] == len(data["records"]) > 5
    assert set(data["errors_by_code"]) == {"NOT_FOUND"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_three_replicas_affinity_and_failover(start_server, tiny_model):
    servers = [start_server("--base-model", tiny_model) for _ in range(3)]
    # base model only (no adapters on disk), so the adapter id is used for routing only:
    # the server answers NOT_FOUND, which proves the request reached that replica.
    targets = [s.target for s in servers]
    adapters = [f"adapter-{i}" for i in range(9)]
    with SwitchboardClient(targets, timeout=30) as client:
        for a in adapters:
            with pytest.raises(errors.NotFound) as info:
                client.generate("x", adapter_id=a, max_new_tokens=2)
            assert info.value.endpoint == rendezvous_order(targets, a)[0]
        owners = {rendezvous_order(targets, a)[0] for a in adapters}
        assert len(owners) >= 2

    # Steady traffic on the base model ("") rotates over the replicas (it is not hashed
    # onto one); kill one of them mid-run.
    victim = servers[0]
    done = threading.Event()
    endpoints: list[str] = []
    failures: list[Exception] = []

    def worker() -> None:
        with SwitchboardClient(targets, timeout=30) as c:
            while not done.is_set():
                try:
                    endpoints.append(c.generate("x", max_new_tokens=4).endpoint)
                except errors.SwitchboardError as err:
                    failures.append(err)

    with ThreadPoolExecutor(3) as pool:
        futs = [pool.submit(worker) for _ in range(3)]
        _wait(lambda: len(endpoints) >= 10)
        victim.proc.kill()
        victim.proc.wait()
        n = len(endpoints)
        _wait(lambda: len(endpoints) >= n + 20)
        done.set()
        for f in futs:
            f.result()
    assert failures == []
    assert set(endpoints[:10]) == set(targets)
    survivors = {t for t in targets if t != victim.target}
    assert set(endpoints[n + 3:]) == survivors


def _wait(predicate, timeout: float = 60.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        done.wait(0.02)
    raise AssertionError("condition not met in time")
