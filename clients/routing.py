"""Multi-endpoint routing: rendezvous (highest random weight) hashing on the adapter id.

Every adapter id ranks all replicas by `hash(endpoint, adapter_id)`; the request goes to
the top one, and on fail-over to the next. Properties the tests check:
- the order for a key depends only on the set of endpoints (not their listing order);
- removing a replica moves only the keys it owned, spread over the remaining ones.
Replicas that just failed with UNAVAILABLE are tried last for `down_seconds`, so a dead
replica costs one failed attempt, not one per request.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"


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
    """Thread-safe rendezvous order with a short penalty for replicas that just failed."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        down_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoints = list(endpoints)
        self.down_seconds = down_seconds
        self._clock = clock
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def multi(self) -> bool:
        return len(self.endpoints) > 1

    def order(self, key: str) -> list[str]:
        ranked = rendezvous_order(self.endpoints, key)
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
