"""Rendezvous hashing: stability, balance, minimal disruption, fail-over order."""

from __future__ import annotations

import collections

import grpc
import pytest

from clients.routing import (
    Router,
    is_retryable,
    parse_targets,
    rendezvous_order,
    rendezvous_score,
)

EPS = ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"]
KEYS = [f"adapter-{i}" for i in range(3000)]


@pytest.mark.parametrize(
    "target, expected",
    [
        ("h:1", ["h:1"]),
        ("h1:1, h2:2,,h1:1", ["h1:1", "h2:2"]),
        (["a:1", "b:2"], ["a:1", "b:2"]),
    ],
)
def test_parse_targets(target, expected):
    assert parse_targets(target) == expected


def test_parse_targets_rejects_empty():
    with pytest.raises(ValueError, match="no endpoint"):
        parse_targets(" , ")


@pytest.mark.parametrize(
    "key, order",
    [("", "321"), ("a", "312"), ("adapter-0", "231"), ("adapter-1", "213"),
     ("adapter-2", "312")],
)
def test_order_is_pinned(key, order):
    # Clients in different processes and versions must agree on the owner of an adapter:
    # this pins blake2b-64 over b"endpoint\0adapter_id".
    assert [ep[7] for ep in rendezvous_order(EPS, key)] == list(order)


def test_score_is_pinned():
    assert rendezvous_score("h:1", "x") == 0x8B905FC8C776E3B3


def test_order_depends_only_on_the_set_of_endpoints():
    for key in KEYS[:200]:
        assert rendezvous_order(EPS, key) == rendezvous_order(list(reversed(EPS)), key)
        assert sorted(rendezvous_order(EPS, key)) == sorted(EPS)


def test_balance():
    owners = collections.Counter(rendezvous_order(EPS, k)[0] for k in KEYS)
    for ep in EPS:
        assert 0.28 < owners[ep] / len(KEYS) < 0.39, owners


def test_removing_a_replica_moves_only_its_keys_to_their_second_choice():
    moved = collections.Counter()
    for key in KEYS:
        before = rendezvous_order(EPS, key)
        after = rendezvous_order([e for e in EPS if e != EPS[1]], key)
        if before[0] != EPS[1]:
            assert after[0] == before[0]
        else:
            assert after[0] == before[1]  # fail-over target == next in the full order
            moved[after[0]] += 1
    # the dead replica's keys spread over both survivors
    assert min(moved.values()) > 0.35 * sum(moved.values())


def test_adding_a_replica_moves_keys_only_to_it():
    grown = EPS + ["10.0.0.4:50051"]
    for key in KEYS[:1000]:
        new_owner = rendezvous_order(grown, key)[0]
        assert new_owner in (rendezvous_order(EPS, key)[0], "10.0.0.4:50051")


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_router_tries_recently_failed_replicas_last_until_the_penalty_expires():
    clock = FakeClock()
    router = Router(EPS, down_seconds=5.0, clock=clock)
    key = "adapter-7"
    full = rendezvous_order(EPS, key)
    assert router.order(key) == full
    router.mark_down(full[0])
    assert router.order(key) == [full[1], full[2], full[0]]
    clock.now += 4.9
    assert router.order(key)[0] == full[1]
    clock.now += 0.2
    assert router.order(key) == full
    router.mark_down(full[0])
    router.mark_up(full[0])
    assert router.order(key) == full


@pytest.mark.parametrize(
    "code, output_seen, expected",
    [
        (grpc.StatusCode.UNAVAILABLE, False, True),
        (grpc.StatusCode.UNAVAILABLE, True, False),
        (grpc.StatusCode.CANCELLED, False, True),
        (grpc.StatusCode.CANCELLED, True, False),
        (grpc.StatusCode.DEADLINE_EXCEEDED, False, False),
        (grpc.StatusCode.NOT_FOUND, False, False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, False, False),
        (grpc.StatusCode.INTERNAL, False, False),
    ],
)
def test_retry_policy(code, output_seen, expected):
    assert is_retryable(code, output_seen=output_seen) is expected
