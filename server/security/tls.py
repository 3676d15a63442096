"""TLS and mutual TLS server credentials from PEM files."""

from __future__ import annotations

from pathlib import Path

import grpc


class TlsConfigError(Exception):
    pass


def server_credentials(cert: Path, key: Path,
                       client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS with the server's certificate chain and key; with `client_ca`, mutual TLS:
    clients must present a certificate signed by that CA or the handshake fails."""
    def read(path: Path, what: str) -> bytes:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise TlsConfigError(f"{what} {path}: {e.strerror or e}") from None
        if b"-----BEGIN" not in data:
            raise TlsConfigError(f"{what} {path}: not a PEM file")
        return data

    chain, private = read(cert, "--tls-cert"), read(key, "--tls-key")
    ca = read(client_ca, "--tls-client-ca") if client_ca else None
    return grpc.ssl_server_credentials([(private, chain)], root_certificates=ca,
                                       require_client_auth=ca is not None)
