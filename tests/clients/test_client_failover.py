"""Client behaviour the real server cannot be made to show on demand, against the
stand-in replicas of conftest.py: the metadata a replica receives, a stream cut after its
first token, broadcast admin calls with one replica down. Affinity and fail-over with
real `switchboard serve` processes are in test_client_e2e.py."""

from __future__ import annotations

import asyncio

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
    assert "x-adapter-id" not in md_list  # no adapter: no hash key for a proxy


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
