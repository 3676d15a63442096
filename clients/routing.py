"""Multi-endpoint routing: rendezvous (highest random weight) hashing on the adapter id.

Every adapter id ranks all replicas by `hash(endpoint, adapter_id)`; the request goes to
the top one, and on fail-over to the next. Properties the tests check:
- the order for a key depends only on the set of endpoints (not their listing order);
- removing a replica moves only the keys it owned, spread over the remaining ones.
The base model ("" as adapter id) is not hashed: its requests rotate over the replicas,
so base traffic is spread rather than piled on one replica. Load is bounded as the proxy
bounds it: a replica carrying more than `balance_factor` x the average of this client's
calls in flight is passed over for an adapter's next replica.
Replicas that just failed with UNAVAILABLE are tried last for `down_seconds`, so a dead
replica costs one failed attempt, not one per request.

The endpoints are a fixed list ("h1:p,h2:p") or a DNS name (`dns:///NAME:PORT`, e.g. a
Kubernetes headless Service), resolved to every address it has and re-resolved every
`refresh_seconds`, so replicas that come and go are followed.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DNS_SCHEME = "dns:///"
log = logging.getLogger(__name__)


def split_host_port(target: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"target {target!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, as sorted, de-duplicated 'ip:port' endpoints."""
    found = set()
    for family, _, _, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        ip = addr[0]
        found.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return sorted(found)


class Resolver:
    """The endpoints behind a DNS name, looked up again once `refresh_seconds` have passed
    (at the next request; no thread). A failed or empty lookup keeps the last good list;
    only a first lookup that finds nothing raises."""

    def __init__(
        self,
        target: str,
        *,
        refresh_seconds: float = 30.0,
        lookup: Callable[[str, int], list[str]] = resolve_addresses,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host, self.port = split_host_port(target.removeprefix(DNS_SCHEME))
        self.refresh_seconds = refresh_seconds
        self._lookup = lookup
        self._clock = clock
        self._lock = threading.Lock()
        self._endpoints: list[str] = []
        self._next = 0.0

    def endpoints(self) -> list[str]:
        with self._lock:
            now = self._clock()
            if self._endpoints and now < self._next:
                return list(self._endpoints)
            try:
                found = sorted(set(self._lookup(self.host, self.port)))
            except OSError as e:
                if not self._endpoints:
                    raise ValueError(f"cannot resolve {self.host!r}: {e}") from None
                log.warning("re-resolving %s failed (%s); keeping %d endpoints", self.host, e,
                            len(self._endpoints))
                found = []
            if found:
                if found != self._endpoints and self._endpoints:
                    log.info("%s now resolves to %s", self.host, ", ".join(found))
                self._endpoints = found
            elif not self._endpoints:
                raise ValueError(f"{self.host!r} resolves to no address")
            self._next = now + self.refresh_seconds
            return list(self._endpoints)


def parse_targets(target: str | Sequence[str]) -> list[str]:
    """'h1:p,h2:p' or ['h1:p', 'h2:p'] -> a de-duplicated list of endpoints, in order."""
    parts = target.split(",") if isinstance(target, str) else list(target)
    endpoints: list[str] = []
    for part in parts:
        ep = part.strip()
        if ep and ep not in endpoints:
            endpoints.append(ep)
    if not endpoints:
        raise ValueError(f"no endpoint in target {target!r}")
    return endpoints


def rendezvous_score(endpoint: str, key: str) -> int:
    digest = hashlib.blake2b(
        endpoint.encode() + b"\x00" + key.encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(endpoints: Sequence[str], key: str) -> list[str]:
    """Endpoints from most to least preferred for `key` (ties broken by name)."""
    return sorted(endpoints, key=lambda ep: (-rendezvous_score(ep, key), ep))


RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


def is_retryable(code: grpc.StatusCode, *, output_seen: bool) -> bool:
    """Retry on another replica only where the caller has seen nothing of the answer:
    UNAVAILABLE (replica down, connection refused or reset) or a CANCELLED the client did
    not ask for (a replica shutting down cancels its in-flight calls), before any output.
    Unary calls have no partial output; generation is side-effect free and adapter loads
    replace by id, so running one again elsewhere is safe. Anything else (NOT_FOUND,
    RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED...) is the answer and is raised as it is.
    """
    return code in RETRYABLE_CODES and not output_seen


class Router:
    """Thread-safe rendezvous order with a short penalty for replicas that just failed;
    over a fixed list of endpoints or a `Resolver`'s current ones."""

    def __init__(
        self,
        endpoints: Sequence[str] | Resolver,
        *,
        down_seconds: float = 5.0,
        balance_factor: float | None = 1.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`balance_factor`: bounded load, as the proxy's `hash-balance-factor` (1.5 =
        150): a replica with this client's calls in flight at `factor` x the average
        (counting the new call) goes to the back of an adapter's order, so one hot
        adapter spills over to its next replica. None turns the bound off."""
        if balance_factor is not None and balance_factor < 1.0:
            raise ValueError(f"balance_factor must be >= 1.0, got {balance_factor}")
        self._source = endpoints if isinstance(endpoints, Resolver) else list(endpoints)
        self.down_seconds = down_seconds
        self.balance_factor = balance_factor
        self._clock = clock
        self._down_until: dict[str, float] = {}
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()
        self._turn = itertools.count()

    @contextlib.contextmanager
    def using(self, endpoint: str) -> Iterator[None]:
        """Counts a call in flight on `endpoint` for the load bound."""
        with self._lock:
            self._in_flight[endpoint] = self._in_flight.get(endpoint, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._in_flight[endpoint] - 1
                if left:
                    self._in_flight[endpoint] = left
                else:
                    del self._in_flight[endpoint]

    def _over_bound(self, endpoints: list[str]) -> set[str]:
        if self.balance_factor is None or len(endpoints) < 2:
            return set()
        with self._lock:
            load = {ep: self._in_flight.get(ep, 0) for ep in endpoints}
        bound = math.ceil(self.balance_factor * (sum(load.values()) + 1) / len(endpoints))
        return {ep for ep, n in load.items() if n + 1 > bound}

    @property
    def endpoints(self) -> list[str]:
        if isinstance(self._source, Resolver):
            return self._source.endpoints()
        return list(self._source)

    @property
    def multi(self) -> bool:
        return isinstance(self._source, Resolver) or len(self._source) > 1

    def order(self, key: str) -> list[str]:
        endpoints = self.endpoints
        if key:
            ranked = rendezvous_order(endpoints, key)
        else:  # the base model: rotate, so base traffic is spread, not hashed to one
            ranked = sorted(endpoints)
            k = next(self._turn) % len(ranked)
            ranked = ranked[k:] + ranked[:k]
        if key:  # an adapter keeps its replica until that replica is over the bound
            full = self._over_bound(ranked)
            ranked = [ep for ep in ranked if ep not in full] + [ep for ep in ranked if ep in full]
        now = self._clock()
        with self._lock:
            down = {ep for ep, until in self._down_until.items() if until > now}
        return [ep for ep in ranked if ep not in down] + [ep for ep in ranked if ep in down]

    def mark_down(self, endpoint: str) -> None:
        with self._lock:
            self._down_until[endpoint] = self._clock() + self.down_seconds

    def mark_up(self, endpoint: str) -> None:
        if endpoint in self._down_until:
            with self._lock:
                self._down_until.pop(endpoint, None)
