"""Helpers for the security tests: certificates made on the spot with `cryptography`,
keys files, and small gRPC call helpers."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc

from server.security.keys import hash_key
from switchboard.v1 import switchboard_pb2 as pb


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def _write_pem(out: Path, name: str, cert, key) -> Pem:
    from cryptography.hazmat.primitives import serialization

    c, k = out / f"{name}.crt", out / f"{name}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return Pem(c, k)


def make_cert(out: Path, name: str, *, issuer: tuple | None = None, ca: bool = False,
              server: bool = False):
    """A certificate and key; self-signed when `issuer` (cert, key) is None.
    -> (Pem, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(subject)
         .issuer_name(issuer_cert.subject if issuer_cert else subject)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    cert = b.sign(issuer_key, hashes.SHA256())
    return _write_pem(out, name, cert, key), cert, key


@dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    rogue_client: Pem  # signed by a CA the server does not trust


def make_pki(out: Path) -> Pki:
    ca, ca_cert, ca_key = make_cert(out, "ca", ca=True)
    server, _, _ = make_cert(out, "server", issuer=(ca_cert, ca_key), server=True)
    client, _, _ = make_cert(out, "client", issuer=(ca_cert, ca_key))
    _, rogue_ca_cert, rogue_ca_key = make_cert(out, "rogue-ca", ca=True)
    rogue, _, _ = make_cert(out, "rogue-client", issuer=(rogue_ca_cert, rogue_ca_key))
    return Pki(ca, server, client, rogue)


def write_keys(path: Path, entries: list[dict]) -> None:
    """entries: dicts with 'key' (plain, hashed here) and the other keys-file fields."""
    import yaml

    out = []
    for e in entries:
        e = dict(e)
        scheme = e.pop("scheme", "sha256")
        e["hash"] = hash_key(e.pop("key"), scheme)
        out.append(e)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"keys": out}))
    tmp.replace(path)  # atomic, as an operator's tooling should do it


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def small(adapter_id: str = "", n: int = 4, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(adapter_id=adapter_id, prompt=kw.pop("prompt", "hello there"),
                              stopping=pb.StoppingCriteria(max_new_tokens=n, ignore_eos=True),
                              **kw)


def code_of(fn, *args, **kw) -> grpc.StatusCode:
    try:
        fn(*args, **kw)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def rpc_error(fn, *args, **kw) -> grpc.RpcError:
    try:
        fn(*args, **kw)
    except grpc.RpcError as e:
        return e
    raise AssertionError("the call succeeded")
