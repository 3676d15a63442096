"""Connection settings shared by the sync and aio clients: TLS, call metadata, deadlines."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import grpc

# PEM given as bytes, or as a path to a file holding it.
PemSource = bytes | str | Path

CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)


def _read_pem(source: PemSource | None) -> bytes | None:
    if source is None:
        return None
    if isinstance(source, bytes):
        return source
    return Path(source).expanduser().read_bytes()


@dataclass(frozen=True)
class TlsConfig:
    """Server-authenticated TLS, plus mTLS when a client certificate and key are given."""

    root_certificates: bytes | None = None  # None = system roots
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None  # overrides the name checked against the certificate

    @classmethod
    def from_sources(
        cls,
        *,
        root_cert: PemSource | None = None,
        client_cert: PemSource | None = None,
        client_key: PemSource | None = None,
        server_name: str | None = None,
    ) -> TlsConfig:
        if (client_cert is None) != (client_key is None):
            raise ValueError("mTLS needs both client_cert and client_key")
        return cls(_read_pem(root_cert), _read_pem(client_cert), _read_pem(client_key),
                   server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def options(self) -> tuple[tuple[str, str], ...]:
        if self.server_name:
            return (("grpc.ssl_target_name_override", self.server_name),)
        return ()


def call_metadata(
    adapter_id: str, api_key: str | None, request_id: str | None = None
) -> tuple[tuple[str, str], ...]:
    """`x-adapter-id` on every call that names an adapter: the key a proxy hashes on
    (haproxy `balance hdr(x-adapter-id)`, Envoy's ring hash). The base model sends none,
    so the proxy spreads base traffic instead of hashing one value onto one replica.
    The API key goes as a bearer token."""
    md = [("x-adapter-id", adapter_id)] if adapter_id else []
    if api_key:
        md.append(("authorization", f"Bearer {api_key}"))
    if request_id:
        md.append(("x-request-id", request_id))
    return tuple(md)


class Deadline:
    """One overall deadline shared by all fail-over attempts of a call."""

    def __init__(self, timeout: float | None) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        if self._end is None:
            return None
        return max(self._end - time.monotonic(), 0.0)

    def expired(self) -> bool:
        return self._end is not None and time.monotonic() >= self._end
