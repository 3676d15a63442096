"""Multi-endpoint mode against three live (stand-in) replicas: affinity and fail-over.

These use the stand-in replicas of conftest.py, since the point is killing a replica
mid-run; the same scenario with three `switchboard serve` processes belongs to the
operations e2e tests.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from clients import errors
from clients.aio import AsyncSwitchboardClient
from clients.client import SwitchboardClient
from clients.routing import rendezvous_order

ADAPTERS = [f"adapter-{i}" for i in range(12)]


def _owner(replicas, adapter_id):
    address = rendezvous_order([r.address for r in replicas], adapter_id)[0]
    return next(r for r in replicas if r.address == address)


def test_metadata_carries_adapter_id_and_api_key(replica):
    with SwitchboardClient(replica.address, api_key="s3cret") as client:
        client.generate("hi", adapter_id="adapter-3")
        client.list_adapters()
    (_, adapter, md), (_, _, md_list) = replica.seen.calls
    assert adapter == "adapter-3"
    assert md["x-adapter-id"] == "adapter-3"
    assert md["authorization"] == "Bearer s3cret"
    assert md["x-request-id"]
    assert md_list["x-adapter-id"] == ""


def test_each_adapter_lands_on_its_rendezvous_owner(replicas):
    target = ",".join(r.address for r in replicas)
    with SwitchboardClient(target) as client:
        for _ in range(3):
            for adapter in ADAPTERS:
                result = client.generate("x", adapter_id=adapter)
                assert result.endpoint == _owner(replicas, adapter).address
                chunks = list(client.generate_stream("x", adapter_id=adapter))
                assert chunks[-1].endpoint == result.endpoint
    for r in replicas:
        mine = {a for a in ADAPTERS if _owner(replicas, a) is r}
        assert r.seen.adapters("Generate") == mine
        assert r.seen.adapters("GenerateStream") == mine
    assert all(r.seen.adapters() for r in replicas), "12 adapters should use all 3 replicas"


def test_killing_a_replica_mid_run_loses_no_request(replicas):
    target = [r.address for r in replicas]
    victim = _owner(replicas, ADAPTERS[0])
    done = threading.Event()
    results, failures = [], []

    def worker(i: int) -> None:
        k = 0
        with SwitchboardClient(target, timeout=10) as client:
            while not done.is_set() or k < 20:
                adapter = ADAPTERS[(i + k) % len(ADAPTERS)]
                try:
                    results.append((adapter, client.generate("x", adapter_id=adapter).endpoint))
                except errors.SwitchboardError as err:
                    failures.append(err)
                k += 1

    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(worker, i) for i in range(4)]
        while len(results) < 100:  # traffic is flowing to every replica
            threading.Event().wait(0.01)
        victim.kill()
        n_at_kill = len(results)
        while len(results) < n_at_kill + 200:
            threading.Event().wait(0.01)
        done.set()
        for f in futs:
            f.result()
    assert failures == []
    after = results[n_at_kill + 20:]
    assert after and all(ep != victim.address for _, ep in after)
    # the victim's adapters moved to their second choice; the others did not move
    survivors = [r for r in replicas if r is not victim]
    for adapter, ep in after:
        assert ep == _owner(survivors, adapter).address


def test_stream_fails_over_before_output_but_not_after(replicas):
    target = [r.address for r in replicas]
    adapter = ADAPTERS[1]
    owner = _owner(replicas, adapter)
    with SwitchboardClient(target) as client:
        owner.kill()
        chunks = list(client.generate_stream("x", adapter_id=adapter, max_new_tokens=3))
        assert chunks[-1].finish_reason == "length"
        assert chunks[-1].endpoint != owner.address


def test_slow_stream_cut_after_output_is_not_retried(make_replica):
    slow = make_replica("slow", token_delay=0.05)
    backup = make_replica("backup")
    target = [slow.address, backup.address]
    adapter = next(a for a in ADAPTERS if rendezvous_order(target, a)[0] == slow.address)
    with SwitchboardClient(target) as client:
        stream = client.generate_stream("x", adapter_id=adapter, max_new_tokens=200)
        first = next(stream)
        assert first.endpoint == slow.address
        slow.kill()
        with pytest.raises(errors.SwitchboardError):
            list(stream)
    assert backup.seen.calls == []


def test_all_replicas_down_raises_unavailable(replicas):
    target = [r.address for r in replicas]
    for r in replicas:
        r.kill()
    with SwitchboardClient(target, timeout=5) as client:
        with pytest.raises(errors.Unavailable):
            client.generate("x", adapter_id="a")


def test_adapter_admin_is_broadcast_to_every_replica(replicas):
    target = [r.address for r in replicas]
    with SwitchboardClient(target) as client:
        assert client.load_adapter("adapter-5").replaced is False
        assert client.load_adapter("adapter-5").adapter.version == "2"
        assert all(r.servicer.adapters == {"adapter-5": 2} for r in replicas)
        replicas[0].kill()
        assert client.unload_adapter("adapter-5") is True
        assert all(r.servicer.adapters == {} for r in replicas[1:])
        with pytest.raises(errors.NotFound):
            client.load_adapter("missing")
        assert client.health_all() == {
            replicas[0].address: "UNAVAILABLE",
            replicas[1].address: "SERVING",
            replicas[2].address: "SERVING",
        }


def test_aio_client_routes_fails_over_and_streams(replicas):
    target = [r.address for r in replicas]

    async def main():
        async with AsyncSwitchboardClient(target, api_key="k") as client:
            owner = _owner(replicas, "adapter-2")
            r = await client.generate("hi", adapter_id="adapter-2")
            assert r.endpoint == owner.address and r.text.endswith(":hi")
            owner.kill()
            chunks = [c async for c in client.generate_stream("hi", adapter_id="adapter-2")]
            assert "".join(c.text for c in chunks) == "t0 t1 t2 t3 "
            assert chunks[-1].endpoint != owner.address
            assert await client.health() == "SERVING"
            assert (await client.model_info()).vocab_size == 49152
            with pytest.raises(errors.NotFound):
                await client.chat([{"role": "user", "content": "x"}], adapter_id="missing")

    asyncio.run(main())
