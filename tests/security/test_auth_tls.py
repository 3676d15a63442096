"""API keys, per-adapter access, admin rights, key reload, per-key concurrency, TLS and
mutual TLS, and the loopback-only bind without keys: against real server processes."""

from __future__ import annotations

import shutil

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from security_support import bearer, code_of, rpc_error, small, write_keys
from support import wait_for

from clients import errors
from clients.cli import main as cli_main
from clients.client import SwitchboardClient
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
KEYS = [
    {"name": "alice", "key": "alice-key", "adapters": ["tenant-a*"], "base_model": False},
    {"name": "bob", "key": "bob-key", "scheme": "scrypt", "adapters": ["tenant-b"]},
    {"name": "ops", "key": "ops-key", "adapters": ["*"], "admin": True},
    {"name": "limited", "key": "limited-key", "max_concurrent": 1},
]


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    write_keys(path, KEYS)
    return path


@pytest.fixture(scope="module")
def tls_server(tiny_model, lora_source, keys_file, pki, tmp_path_factory):
    from support import ServerProcess

    root = tmp_path_factory.mktemp("adapters")
    for name in ("tenant-a", "tenant-a-v2", "tenant-b"):
        shutil.copytree(lora_source / name, root / name)
    s = ServerProcess(["--base-model", str(tiny_model), "--adapter-dir", str(root),
                       "--max-seq-len", "512", "--kv-cache-memory", "16MiB",
                       "--max-new-tokens", "400", "--enable-admin",
                       "--api-keys", str(keys_file),
                       "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def channel(tls_server, pki):
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert.read_bytes())
    ch = grpc.secure_channel(tls_server.target, creds)
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.TextGenerationStub(channel)


def gen(stub, key: str | None, adapter: str = "") -> grpc.StatusCode:
    md = bearer(key) if key else ()
    return code_of(stub.Generate, small(adapter), metadata=md, timeout=30)


def test_startup_message_names_keys_and_tls(tls_server):
    out = "".join(tls_server.lines)
    assert "API keys required (4 in" in out and "security: TLS" in out
    assert "AdapterAdmin on" in out


def test_missing_or_unknown_key_is_unauthenticated(stub, channel):
    admin = pb_grpc.AdapterAdminStub(channel)
    calls = [
        lambda md: stub.Generate(small(), metadata=md, timeout=30),
        lambda md: list(stub.GenerateStream(small(), metadata=md, timeout=30)),
        lambda md: stub.Tokenize(pb.TokenizeRequest(prompt="x"), metadata=md, timeout=30),
        lambda md: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md, timeout=30),
        lambda md: admin.ListAdapters(pb.ListAdaptersRequest(), metadata=md, timeout=30),
    ]
    for call in calls:
        err = rpc_error(call, ())
        assert err.code() == UNAUTHENTICATED and "missing API key" in err.details()
        for md in (bearer("wrong-key"), (("authorization", "Basic alice-key"),),
                   (("authorization", "Bearer "),)):
            assert code_of(call, md) == UNAUTHENTICATED
    # Probes need no key.
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING


def test_adapter_patterns_and_no_existence_leak(stub):
    assert gen(stub, "alice-key", "tenant-a") == grpc.StatusCode.OK
    assert gen(stub, "alice-key", "tenant-a-v2") == grpc.StatusCode.OK
    assert gen(stub, "bob-key", "tenant-b") == grpc.StatusCode.OK  # scrypt-hashed key
    assert gen(stub, "bob-key", "") == grpc.StatusCode.OK
    # An adapter outside the patterns is refused the same way whether or not it exists.
    existing = rpc_error(stub.Generate, small("tenant-b"), metadata=bearer("alice-key"),
                         timeout=30)
    missing = rpc_error(stub.Generate, small("tenant-zzz"), metadata=bearer("alice-key"),
                        timeout=30)
    assert existing.code() == missing.code() == DENIED
    assert existing.details().replace("tenant-b", "X") == \
        missing.details().replace("tenant-zzz", "X")
    assert gen(stub, "bob-key", "tenant-a") == DENIED
    assert gen(stub, "alice-key", "") == DENIED  # base_model: false
    # Inside the patterns, a missing adapter is NOT_FOUND as for anyone.
    assert gen(stub, "alice-key", "tenant-a-missing") == grpc.StatusCode.NOT_FOUND
    err = rpc_error(lambda: list(stub.GenerateStream(small("tenant-b"),
                                                     metadata=bearer("alice-key"), timeout=30)))
    assert err.code() == DENIED and "'alice' may not use adapter 'tenant-b'" in err.details()


def test_admin_needs_an_admin_key(channel):
    admin = pb_grpc.AdapterAdminStub(channel)
    err = rpc_error(admin.ListAdapters, pb.ListAdaptersRequest(), metadata=bearer("alice-key"),
                    timeout=30)
    assert err.code() == DENIED and "AdapterAdmin" in err.details()
    assert code_of(admin.LoadAdapter, pb.LoadAdapterRequest(adapter_id="x", path="tenant-b"),
                   metadata=bearer("bob-key"), timeout=30) == DENIED
    listed = admin.ListAdapters(pb.ListAdaptersRequest(), metadata=bearer("ops-key"),
                                timeout=30)
    assert {a.adapter_id for a in listed.adapters} == {"tenant-a", "tenant-a-v2", "tenant-b"}


def test_keys_file_reloaded_on_change(stub, keys_file):
    try:
        write_keys(keys_file, [*KEYS[1:], {"name": "carol", "key": "carol-key"}])
        wait_for(lambda: gen(stub, "carol-key") == grpc.StatusCode.OK, timeout=15)
        assert gen(stub, "alice-key", "tenant-a") == UNAUTHENTICATED
        # A broken file (half-written, bad YAML) keeps the keys in force.
        keys_file.write_text("keys: [ {name: broken")
        wait_for(lambda: gen(stub, "carol-key") == grpc.StatusCode.OK, timeout=5)
        keys_file.write_text("keys:\n  - name: plain\n    hash: not-a-hash\n")
        assert gen(stub, "carol-key") == grpc.StatusCode.OK
    finally:
        write_keys(keys_file, KEYS)
    wait_for(lambda: gen(stub, "alice-key", "tenant-a") == grpc.StatusCode.OK, timeout=15)
    assert gen(stub, "carol-key") == UNAUTHENTICATED


def test_per_key_concurrency_limit_with_retry_hint(stub):
    md = bearer("limited-key")
    long = pb.GenerateRequest(prompt="count", stopping=pb.StoppingCriteria(
        max_new_tokens=400, ignore_eos=True))
    first = stub.GenerateStream(long, metadata=md, timeout=60)
    next(first)
    err = rpc_error(stub.Generate, small(), metadata=md, timeout=30)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'limited'" in err.details() and "the limit is 1" in err.details()
    assert ("retry-after-ms", "500") in tuple(err.trailing_metadata())
    assert gen(stub, "bob-key") == grpc.StatusCode.OK  # other keys are not affected
    first.cancel()
    wait_for(lambda: gen(stub, "limited-key") == grpc.StatusCode.OK, timeout=15)


def test_client_library_and_cli_with_tls_and_key(tls_server, pki, capsys):
    with SwitchboardClient(tls_server.target, root_cert=pki.ca.cert, api_key="alice-key",
                           timeout=30) as client:
        r = client.generate("hello", adapter_id="tenant-a", max_new_tokens=3, ignore_eos=True)
        assert r.completion_tokens == 3 and r.adapter_id == "tenant-a"
        with pytest.raises(errors.PermissionDenied):
            client.generate("hello", adapter_id="tenant-b", max_new_tokens=3)
    with SwitchboardClient(tls_server.target, root_cert=pki.ca.cert, timeout=30) as client:
        with pytest.raises(errors.Unauthenticated):
            client.generate("hello", max_new_tokens=3)
    rc = cli_main(["--target", tls_server.target, "--tls-ca", str(pki.ca.cert),
                   "--api-key", "bob-key", "--json", "generate", "hello", "-n", "3",
                   "-a", "tenant-b"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "completion_tokens" in out.out


def test_plaintext_client_refused_by_tls_server(tls_server):
    with grpc.insecure_channel(tls_server.target) as ch:
        stub = pb_grpc.TextGenerationStub(ch)
        assert code_of(stub.Generate, small(), metadata=bearer("bob-key"),
                       timeout=5) == grpc.StatusCode.UNAVAILABLE


# ---- mutual TLS, no keys, admin off, loopback-only -----------------------------------

@pytest.fixture(scope="module")
def mtls_server(tiny_model, pki, tmp_path_factory):
    from support import ServerProcess

    s = ServerProcess(["--base-model", str(tiny_model), "--host", "0.0.0.0",
                       "--adapter-dir", str(tmp_path_factory.mktemp("none")),
                       "--max-seq-len", "128", "--kv-cache-memory", "8MiB",
                       "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                       "--tls-client-ca", str(pki.ca.cert)])
    yield s
    s.stop()


def _mtls_code(server, pki, cert=None) -> grpc.StatusCode:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert.read_bytes(),
        private_key=cert.key.read_bytes() if cert else None,
        certificate_chain=cert.cert.read_bytes() if cert else None)
    with grpc.secure_channel(server.target, creds) as ch:
        return code_of(pb_grpc.TextGenerationStub(ch).Generate, small(), timeout=10)


def test_mtls_needs_a_client_certificate_from_the_ca(mtls_server, pki):
    assert _mtls_code(mtls_server, pki, pki.client) == grpc.StatusCode.OK
    assert _mtls_code(mtls_server, pki) == grpc.StatusCode.UNAVAILABLE
    assert _mtls_code(mtls_server, pki, pki.rogue_client) == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(mtls_server.target) as ch:
        assert code_of(pb_grpc.TextGenerationStub(ch).Generate, small(),
                       timeout=5) == grpc.StatusCode.UNAVAILABLE
    with SwitchboardClient(mtls_server.target, root_cert=pki.ca.cert,
                           client_cert=pki.client.cert, client_key=pki.client.key,
                           timeout=30) as client:
        assert client.generate("hi", max_new_tokens=2, ignore_eos=True).completion_tokens == 2
    assert _mtls_code(mtls_server, pki, pki.client) == grpc.StatusCode.OK


def test_no_keys_binds_loopback_and_admin_is_off(mtls_server, pki):
    out = "".join(mtls_server.lines)
    assert "binding 127.0.0.1 instead of 0.0.0.0" in out
    assert "switchboard: listening on 127.0.0.1:" in out
    assert "mutual TLS" in out and "AdapterAdmin off" in out
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert.read_bytes(), private_key=pki.client.key.read_bytes(),
        certificate_chain=pki.client.cert.read_bytes())
    with grpc.secure_channel(mtls_server.target, creds) as ch:
        admin = pb_grpc.AdapterAdminStub(ch)
        assert code_of(admin.ListAdapters, pb.ListAdaptersRequest(),
                       timeout=10) == grpc.StatusCode.UNIMPLEMENTED
