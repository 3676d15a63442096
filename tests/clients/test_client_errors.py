"""gRPC status -> typed exception mapping, pure and over the wire."""

from __future__ import annotations

import grpc
import pytest

from clients import errors
from clients.client import SwitchboardClient
from clients.errors import from_rpc_error


class FakeCall(grpc.RpcError):
    """The three accessors of grpc.Call / AioRpcError that the mapping reads."""

    def __init__(self, code, details="", trailing=()):
        self._code, self._details, self._trailing = code, details, trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c != grpc.StatusCode.OK])
def test_every_status_code_maps_to_a_class_keeping_code_and_message(code):
    err = from_rpc_error(FakeCall(code, "field x is 7, limit 5"), endpoint="h:1")
    assert isinstance(err, errors.SwitchboardError)
    assert err.code == code
    assert err.details == "field x is 7, limit 5"
    assert str(err) == f"{code.name}: field x is 7, limit 5"
    assert err.endpoint == "h:1"
    assert type(err) is errors.error_class(code)
    assert type(err) is not errors.SwitchboardError


@pytest.mark.parametrize(
    "code, cls",
    [
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
        (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.INTERNAL, errors.Internal),
    ],
)
def test_named_classes(code, cls):
    assert isinstance(from_rpc_error(FakeCall(code)), cls)


@pytest.mark.parametrize(
    "trailing, expected",
    [
        ((("retry-after-ms", "250"),), 0.25),
        ((("other", "x"), ("Retry-After-Ms", b"1000")), 1.0),
        ((("retry-after-ms", "soon"),), None),
        ((), None),
    ],
)
def test_retry_after_hint(trailing, expected):
    err = from_rpc_error(FakeCall(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", trailing))
    assert isinstance(err, errors.ResourceExhausted)
    assert err.retry_after == expected


def test_mapping_survives_broken_call_objects():
    class Broken(grpc.RpcError):
        def code(self):
            raise RuntimeError("half-built")

    err = from_rpc_error(Broken())
    assert err.code == grpc.StatusCode.UNKNOWN and err.details == ""


def test_errors_over_the_wire(replica):
    with SwitchboardClient(replica.address) as client:
        with pytest.raises(errors.NotFound, match="adapter 'missing'") as info:
            client.generate("hi", adapter_id="missing")
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert info.value.endpoint == replica.address
        with pytest.raises(errors.ResourceExhausted) as info:
            client.generate("hi", adapter_id="busy")
        assert info.value.retry_after == 1.5
        with pytest.raises(errors.InvalidArgument, match="temperature"):
            client.generate("hi", temperature=-1.0)
        with pytest.raises(errors.NotFound):  # streams map the same way
            list(client.generate_stream("hi", adapter_id="missing"))
        assert client.generate("ok").text == "r0:ok"  # and the client still works


def test_unreachable_single_endpoint_is_unavailable_without_retry():
    with SwitchboardClient("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(errors.Unavailable):
            client.health()
