"""Wiring: model, engine, gRPC services, health, reflection, metrics, signals."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server import __version__
from server.api.convert import RequestConverter
from server.api.health import GrpcHealthReporter, ServerHealth
from server.api.servicer import AdapterAdminServicer, TextGenerationServicer
from server.config import ServerConfig
from server.engine.engine import Engine as PyTorchEngine
from server.engine.engine import helper_thread_init, load_engine_adapters
from server.engine.grammar import GrammarCompiler
from server.engine.loading import ModelLoadError
from server.engine.protocol import Engine
from server.metrics import ServerMetrics
from server.model_store import ModelNotFoundError, resolve_base_model
from server.native import NativeError
from server.output_policy import OutputPolicies, PolicyError, describe
from server.security.interceptor import DrainGate, SecurityInterceptor
from server.security.keys import KeysFileError, KeyStore
from server.security.tls import TlsConfigError, server_credentials
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

log = logging.getLogger("switchboard")
SERVICES = ("switchboard.v1.TextGeneration", "switchboard.v1.AdapterAdmin")


class App:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        sec = config.security  # keys first: a bad keys file fails before the model loads
        self.keys = KeyStore(sec.api_keys) if sec.api_keys is not None else None
        self.output_policies = OutputPolicies(sec.output_policy)  # also before the model
        self.gate = DrainGate()
        self.bind_host = _bind_host(config)
        model_dir = resolve_base_model(config.base_model)
        self.model_id = config.base_model or "smollm2-135m-instruct"
        # the memory gauge reads the served engine (self._memory) at each scrape; the
        # engine hands the metrics to its registry and, with --onnx, the router to each
        # ONNX engine: every component gets its collaborators when it is built
        self.metrics = ServerMetrics(memory_source=self._memory)
        self.pytorch = PyTorchEngine(model_dir, config.adapter_dir, config.engine,
                                     metrics=self.metrics,
                                     output_policies=self.output_policies)
        self.registry = self.pytorch.registry
        self.engine: Engine = self.pytorch  # what the APIs serve from
        if config.onnx.enabled:
            from server.onnx.router import EngineRouter

            self.engine = EngineRouter(self.pytorch, config.onnx)
        self.health = health.HealthServicer()
        self.server_health = ServerHealth(self.engine, self.gate)  # gRPC and HTTP probes
        self.health_reporter: GrpcHealthReporter | None = None
        self.server: grpc.Server | None = None
        self.http = None  # server.api.http.HttpServer with --http-port
        self.port = 0
        self.metrics_port: int | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        cfg = self.config
        failed = load_engine_adapters(self.pytorch, cfg.preload)
        if failed:
            log.warning("adapters not loaded: %s", ", ".join(failed))
        if cfg.watch_seconds > 0:
            threading.Thread(target=self._watch, args=(cfg.watch_seconds,), name="watch",
                             daemon=True).start()
        limit = cfg.limits.max_message_bytes
        interceptor = SecurityInterceptor(  # also the HTTP API's policy (one set of slots)
            self.keys, self.gate, max_concurrent_per_key=cfg.limits.max_concurrent_per_key,
            retry_after_ms=cfg.limits.retry_after_ms, metrics=self.metrics)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.grpc_workers),
            interceptors=[interceptor],
            options=[("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", limit),
                     *_connection_age_options(cfg)],
            maximum_concurrent_rpcs=cfg.grpc_workers,
        )
        info = self.engine.info()
        grammars = GrammarCompiler(self.engine.tokenizer, info.vocab_size,
                                   on_compile=self.metrics.grammar_compiled)
        conv = RequestConverter(self.engine.tokenizer, info.vocab_size, info.max_seq_len,
                                cfg.limits, grammars)
        pb_grpc.add_TextGenerationServicer_to_server(
            TextGenerationServicer(self.engine, self.registry, conv, self.model_id,
                                   info.quantization, self.metrics),
            self.server)
        names = [SERVICES[0]]
        if cfg.enable_admin:
            pb_grpc.add_AdapterAdminServicer_to_server(
                AdapterAdminServicer(self.engine, self.registry), self.server)
            names.append(SERVICES[1])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*names, health.SERVICE_NAME, reflection.SERVICE_NAME,
             pb.DESCRIPTOR.services_by_name["TextGeneration"].full_name], self.server)
        self.health_reporter = GrpcHealthReporter(self.server_health, self.health, names)
        self.health_reporter.start()  # NOT_SERVING until ready, then the engine's health
        sec = cfg.security
        address = f"{_host(self.bind_host)}:{cfg.port}"
        if sec.tls_cert is not None and sec.tls_key is not None:
            creds = server_credentials(sec.tls_cert, sec.tls_key, sec.tls_client_ca)
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise SystemExit(f"error: cannot bind {self.bind_host}:{cfg.port}")
        for line in _security_summary(cfg, self.keys, self.bind_host, names):
            print(f"switchboard: {line}", flush=True)
        self.engine.start()
        self.server.start()
        if cfg.metrics_port >= 0:
            self.metrics.set_info(__version__, self.model_id, info.dtype, info.device,
                                  info.quantization)
            self.metrics.set_adapter_slots(info.max_active_adapters)
            self.metrics_port = self.metrics.start_http_server(
                cfg.metrics_host or self.bind_host, cfg.metrics_port)
        print(f"switchboard: listening on {self.bind_host}:{self.port}"
              + (f" (metrics on port {self.metrics_port})" if self.metrics_port else ""),
              flush=True)
        if cfg.http_port >= 0:
            self._start_http(conv, interceptor)
        self.engine.warmup()
        self.server_health.mark_ready()
        self.health_reporter.update()  # SERVING now (HTTP /health reads it at each probe)
        print("switchboard: ready", flush=True)

    def _memory(self) -> dict[str, int]:
        """The served engine's bytes per part: the metrics' memory source. Read only by a
        scrape, so only once the metrics port is up, long after the engine is built."""
        return self.engine.memory()

    def reload_output_policy(self) -> bool:
        """SIGHUP: read --output-policy again; a malformed file keeps the previous policy.
        New requests get the new policy; running ones keep theirs."""
        path = self.output_policies.path
        if path is None:
            print("switchboard: output policy: SIGHUP without --output-policy, nothing to "
                  "reload", flush=True)
            return False
        try:
            policy = self.output_policies.reload()
        except PolicyError as e:
            log.error("output policy not reloaded: %s", e)
            print(f"switchboard: output policy refused: {e}; the previous policy stays",
                  flush=True)
            return False
        print(f"switchboard: output policy reloaded from {path}: {describe(policy)}",
              flush=True)
        return True

    def _start_http(self, conv: RequestConverter, interceptor: SecurityInterceptor) -> None:
        """The OpenAI-compatible HTTP API over the same engine, converter and policy."""
        from server.api.http import HttpApi, HttpServer

        host = _bind_host(self.config, self.config.http_host or self.config.host)
        api = HttpApi(self.engine, self.registry, conv, interceptor, self.metrics,
                      self.model_id, self.server_health)
        self.http = HttpServer(api, host, self.config.http_port)
        self.http.start()
        print(f"switchboard: http on {host}:{self.http.port} (OpenAI-compatible API)",
              flush=True)

    def _watch(self, interval: float) -> None:
        """--watch: keep the registry in step with the adapter root."""
        while not self._stopped.wait(interval):
            try:
                changes = self.registry.sync_with_disk()
            except Exception:  # a bad directory must not end the watcher
                log.exception("adapter watch failed")
                continue
            if any(changes.values()):
                log.info("adapter root changed: %s", changes)

    def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls with UNAVAILABLE, let running ones finish
        within the grace period, then stop the server (cancelling what is left)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.drain_seconds if grace is None else grace
        if self.health_reporter is not None:
            self.health_reporter.stop()
        self.health.enter_graceful_shutdown()
        t0 = time.monotonic()
        drained = self.gate.drain(grace)
        left = self.gate.in_flight
        log.info("drain %s after %.1fs%s", "done" if drained else "timed out",
                 time.monotonic() - t0, "" if drained else f" ({left} calls cancelled)")
        if self.server is not None:
            self.server.stop(0.5 if drained else 0).wait()
        if self.http is not None:
            self.http.stop()
        self.engine.stop()

    def wait(self) -> None:
        self._stopped.wait()


_LOOPBACK = ("127.0.0.1", "::1", "localhost", "[::1]")


def _is_loopback(host: str) -> bool:
    return host in _LOOPBACK or host.startswith("127.")


def _bind_host(cfg: ServerConfig, host: str | None = None) -> str:
    """Without API keys, only loopback unless --allow-insecure-bind."""
    sec = cfg.security
    host = cfg.host if host is None else host
    if sec.api_keys is None and not sec.allow_insecure_bind and not _is_loopback(host):
        return "127.0.0.1"
    return host


def _security_summary(cfg: ServerConfig, keys: KeyStore | None, bind_host: str,
                      services) -> list[str]:
    sec = cfg.security
    lines = []
    if keys is None:
        note = "any local caller is served"
        if bind_host != cfg.host:
            note = (f"binding {bind_host} instead of {cfg.host} (pass --api-keys, or "
                    "--allow-insecure-bind to serve without keys on other addresses)")
        elif not _is_loopback(bind_host):
            note = f"--allow-insecure-bind: anyone reaching {bind_host} is served"
        lines.append(f"security: no API keys (no --api-keys); {note}")
    else:
        lines.append(f"security: API keys required ({len(keys.keys)} in {keys.path}, "
                     "reloaded on change)")
    if sec.tls_cert is None:
        lines.append("security: TLS off (plain-text gRPC)")
    else:
        lines.append("security: " + ("mutual TLS (client certificates required)"
                                     if sec.tls_client_ca else "TLS"))
    if sec.output_policy is None:
        lines.append("security: output policy: none global (--output-policy); adapters' own "
                     "policies apply")
    else:
        lines.append(f"security: output policy {sec.output_policy} (reloaded on SIGHUP)")
    admin = "on" if SERVICES[1] in services else "off (--enable-admin to serve it)"
    lines.append(f"security: AdapterAdmin {admin}")
    return lines


def _connection_age_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    """Connections older than --max-connection-age get a GOAWAY, so a client's next calls
    open a new connection (which a proxy or kube-proxy may send to a new replica); the
    calls still running on it get the drain period to finish."""
    if cfg.max_connection_age <= 0:
        return []
    return [("grpc.max_connection_age_ms", int(cfg.max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(cfg.drain_seconds * 1000))]


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def serve(config: ServerConfig) -> int:
    helper_thread_init()  # before any torch work here: the engine thread owns the cores
    try:
        app = App(config)
    except (ModelNotFoundError, ModelLoadError, KeysFileError, NativeError, PolicyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = threading.Event()

    def on_signal(signum, frame) -> None:
        log.info("signal %s: draining (grace %.0fs)", signal.Signals(signum).name,
                 config.drain_seconds)
        threading.Thread(target=lambda: (app.stop(), done.set()), daemon=True).start()

    def on_hangup(signum, frame) -> None:
        threading.Thread(target=app.reload_output_policy, name="policy-reload",
                         daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    signal.signal(signal.SIGINT, on_signal)
    try:
        app.start()
    except TlsConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done.wait()
    log.info("stopped")
    return 0
