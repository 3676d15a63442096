"""One health answer for both probes: HTTP `GET /health` and the gRPC health service.

`ServerHealth.check` decides: "starting" until the app marks the server ready (after the
warm-up), "draining" once the drain gate closes, else the engine's own `health()` (the
Engine protocol: its threads running, not before start, not after stop, not died).
`GrpcHealthReporter` keeps the gRPC health service at that answer: SERVING only while it
is "ok", NOT_SERVING otherwise, for the server ("") and each service name.
"""

from __future__ import annotations

import logging
import threading

from grpc_health.v1 import health_pb2

from server.engine.protocol import Engine
from server.security.interceptor import DrainGate

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServerHealth:
    def __init__(self, engine: Engine, gate: DrainGate) -> None:
        self.engine = engine
        self.gate = gate
        self._ready = threading.Event()

    def mark_ready(self) -> None:
        """The server is up and warmed: from now on the engine's health decides."""
        self._ready.set()

    def check(self) -> tuple[str, str]:
        """(status, detail): status "ok", "draining", "starting" or "unhealthy" (detail:
        why, from the engine)."""
        if self.gate.draining:
            return "draining", ""
        if not self._ready.is_set():
            return "starting", ""
        health = self.engine.health()
        if not health.ok:
            return "unhealthy", health.detail
        return "ok", ""


class GrpcHealthReporter:
    """Sets the gRPC health servicer (grpc_health's HealthServicer) to what `health`
    says, now (`update`) and every `interval` seconds on a daemon thread (`start`), so an
    engine that stops or whose thread dies turns the service NOT_SERVING within one
    interval; Watch streams get each change. The drain itself goes through the
    servicer's `enter_graceful_shutdown` (app.py), which holds NOT_SERVING for good."""

    def __init__(self, health: ServerHealth, servicer, services: list[str],
                 interval: float = 1.0) -> None:
        self.health = health
        self.servicer = servicer
        self.services = ["", *services]
        self.interval = interval
        self._status: int | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self) -> int:
        """Read the health now and set the services to it; -> the status set."""
        status, detail = self.health.check()
        serving = SERVING if status == "ok" else NOT_SERVING
        with self._lock:
            if serving != self._status:
                if status == "unhealthy":
                    log.error("health: NOT_SERVING: %s", detail)
                elif self._status is not None:  # not the first NOT_SERVING, at start
                    log.info("health: %s (%s)", "SERVING" if serving == SERVING
                             else "NOT_SERVING", status)
                self._status = serving
                for name in self.services:
                    self.servicer.set(name, serving)
        return serving

    def start(self) -> None:
        self.update()
        self._thread = threading.Thread(target=self._watch, name="health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                self.update()
            except Exception:  # a failing check must not end the watcher
                log.exception("health check failed")
