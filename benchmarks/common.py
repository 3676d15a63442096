"""Helpers shared by the benchmarks: a server process, the default model, tables, JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from clients.provenance import cpu_info
from clients.provenance import provenance as client_provenance

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 30 s; reaps the process."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Server:
    """`switchboard serve` as a subprocess on loopback, port picked by the server; used by
    the benchmarks and the tests. `--metrics-port -1` unless the args name one."""

    def __init__(self, args: list, timeout: float = 600.0, cwd: Path = REPO) -> None:
        """cwd: the source tree to run (benchmarks.ab_serving runs an older revision's)."""
        args = [str(a) for a in args]
        cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1",
               "--port", "0", *args]
        if "--metrics-port" not in args:
            cmd += ["--metrics-port", "-1"]
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0  # with --http-port
        self.lines: list[str] = []
        ready = threading.Event()

        def pump() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if line.startswith("switchboard: listening on"):
                    self.port = int(line.split()[3].rsplit(":", 1)[1])
                    if "metrics on port" in line:
                        self.metrics_port = int(line.rstrip().rstrip(")").rsplit(" ", 1)[1])
                if line.startswith("switchboard: http on"):
                    self.http_port = int(line.split()[3].rsplit(":", 1)[1])
                if line.startswith("switchboard: ready"):
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-40:]))

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible API's base URL (`--http-port`), e.g. for openai.OpenAI."""
        return f"http://127.0.0.1:{self.http_port}/v1"

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def machine() -> dict[str, Any]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, **cpu_info(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def provenance() -> dict[str, Any]:
    """Date, command line, commit and machine (torch and threads too): what every results
    JSON carries."""
    return {**client_provenance(), "machine": machine()}


def write_results(name: str, data: dict[str, Any], path: Path | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = path or RESULTS / f"{name}.json"
    data = {"benchmark": name, **provenance(), **data}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}\n" + "-" * (width + 16))
    for key, value in rows:
        shown = f"{value:,.3f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown:>12}")
