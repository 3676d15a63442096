"""Client-side routing over a DNS name: every address it resolves to, re-resolved, base
traffic rotated over the replicas. The lookup is a parameter: the real one (localhost),
or a table the test changes to stand for a headless Service whose pods come and go."""

from __future__ import annotations

import collections

import pytest

from clients import SwitchboardClient
from clients.routing import Resolver, Router, resolve_addresses, split_host_port


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Table:
    """A stand-in DNS: name -> addresses, changed by the test."""

    def __init__(self, endpoints: list[str]) -> None:
        self.endpoints = endpoints
        self.calls = 0
        self.fail = False

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        if self.fail:
            raise OSError("temporary failure in name resolution")
        return list(self.endpoints)


def test_split_host_port():
    assert split_host_port("svc.ns:50051") == ("svc.ns", 50051)
    assert split_host_port("[::1]:9") == ("::1", 9)
    with pytest.raises(ValueError, match="HOST:PORT"):
        split_host_port("no-port")


def test_the_real_lookup_finds_localhost():
    assert "127.0.0.1:50051" in resolve_addresses("localhost", 50051)


def test_resolver_refreshes_after_its_period_and_keeps_the_last_good_list():
    clock, table = Clock(), Table(["10.0.0.2:1", "10.0.0.1:1"])
    r = Resolver("dns:///svc:1", refresh_seconds=30, lookup=table, clock=clock)
    assert r.endpoints() == ["10.0.0.1:1", "10.0.0.2:1"]
    table.endpoints = ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]
    clock.now = 29.0
    assert len(r.endpoints()) == 2 and table.calls == 1  # cached
    clock.now = 30.0
    assert r.endpoints() == ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]
    table.fail = True
    clock.now = 61.0
    assert len(r.endpoints()) == 3  # a failed lookup keeps what worked
    table.fail, table.endpoints = False, []
    clock.now = 92.0
    assert len(r.endpoints()) == 3  # so does an empty answer


def test_a_name_that_never_resolved_is_an_error():
    table = Table([])
    with pytest.raises(ValueError, match="resolves to no address"):
        Resolver("dns:///svc:1", lookup=table).endpoints()
    table.fail = True
    with pytest.raises(ValueError, match="cannot resolve 'svc'"):
        Resolver("dns:///svc:1", lookup=table).endpoints()


def test_base_requests_rotate_while_adapters_stick():
    router = Router(["a:1", "b:1", "c:1"])
    firsts = collections.Counter(router.order("")[0] for _ in range(30))
    assert firsts == {"a:1": 10, "b:1": 10, "c:1": 10}
    assert len({router.order("tenant-7")[0] for _ in range(10)}) == 1


def test_a_replica_that_appears_in_dns_gets_traffic(make_replica):
    """Two stand-in replicas behind a name; a third appears; after the refresh the client
    sends it base requests and the adapters that now hash to it."""
    r1, r2, r3 = (make_replica(n) for n in ("r1", "r2", "r3"))
    table = Table([r1.address, r2.address])
    with SwitchboardClient("dns:///replicas.test:50051", resolve=table,
                           resolve_seconds=0) as client:
        for _ in range(4):
            client.generate("x", max_new_tokens=1)
        assert r3.seen.calls == []
        table.endpoints = [r1.address, r2.address, r3.address]  # looked up at each call
        for _ in range(6):
            client.generate("x", max_new_tokens=1)
        adapters = [f"adapter-{i}" for i in range(30)]
        for adapter in adapters:
            client.generate("x", adapter_id=adapter, max_new_tokens=1)
    base_on_r3 = [c for c in r3.seen.calls if c[1] == ""]
    assert len(base_on_r3) == 2  # one in three of the six base requests
    assert 0 < len([c for c in r3.seen.calls if c[1]]) < len(adapters)


def test_a_dns_target_works_end_to_end(replica):
    port = replica.address.rsplit(":", 1)[1]
    with SwitchboardClient(f"dns:///localhost:{port}") as client:
        assert f"127.0.0.1:{port}" in client.endpoints
        # localhost may also resolve to ::1, where nothing listens: fail-over covers it
        for _ in range(3):
            assert client.generate("x", adapter_id="a", max_new_tokens=2).text


def test_the_load_bound_passes_over_a_busy_replica():
    router = Router(["a:1", "b:1", "c:1"], balance_factor=1.5)
    home = router.order("hot")[0]
    with router.using(home):  # 1 in flight: bound ceil(1.5 * 2 / 3) = 1 -> home is full
        assert router.order("hot")[0] != home
        assert router.order("hot")[-1] == home
    assert router.order("hot")[0] == home  # back once the call ended
    unbounded = Router(["a:1", "b:1", "c:1"], balance_factor=None)
    with unbounded.using(home), unbounded.using(home):
        assert unbounded.order("hot")[0] == home
    with pytest.raises(ValueError, match="balance_factor must be >= 1.0"):
        Router(["a:1"], balance_factor=0.5)


def test_a_hot_adapter_spills_over_from_one_client(make_replica):
    replicas = [make_replica(f"r{i}", token_delay=0.02) for i in range(3)]
    targets = [r.address for r in replicas]
    with SwitchboardClient(targets) as client:
        streams = [client.generate_stream("x", adapter_id="hot", max_new_tokens=20)
                   for _ in range(6)]
        firsts = [next(s) for s in streams]  # all six in flight at once
        for s in streams:
            list(s)
    served = collections.Counter(chunk.endpoint for chunk in firsts)
    assert len(served) >= 2 and max(served.values()) < 6, served
