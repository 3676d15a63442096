"""Routing across replicas through the proxy we ship (deploy/haproxy/haproxy.cfg, with
its DNS server-template replaced by static servers on loopback): three tiny-model server
replicas behind a real haproxy. Each replica's own /metrics says which requests it
served. Shown in order: adapter affinity, base-model requests spread over all three
(no header, or an empty one), a hot adapter overflowing past the load bound, fail-over
when a replica is killed, and a replica added later receiving traffic."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading
from collections import Counter
from pathlib import Path

import grpc
import pytest
from support import ServerProcess, make_lora, make_tiny_model, wait_for

from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from .conftest import DEPLOY
from .test_metrics_truth import Scrape

ADAPTERS = [f"tenant-{i}" for i in range(6)]
REQUESTS = "switchboard_requests_total"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proxy_config(shipped: str, listen: int, servers: dict[str, int], sock: Path) -> str:
    """The shipped config with loopback addresses: static servers instead of the DNS
    template, a stats socket to read server states, fewer connections for a test box."""
    text = shipped.replace("bind :8080", f"bind 127.0.0.1:{listen}")
    text = text.replace("    maxconn 4096\n",
                        f"    maxconn 512\n    stats socket {sock} mode 600 level admin\n")
    static = "".join(f"    server {name} 127.0.0.1:{port}\n" for name, port in servers.items())
    text = re.sub(r"    server-template .*\n", static, text)
    text = re.sub(r"\nresolvers cluster\n(    .*\n)*", "\n", text)
    live = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any("server-template" in line or "resolvers" in line for line in live)
    return text


class Proxy:
    def __init__(self, binary: str, workdir: Path, servers: dict[str, int]) -> None:
        self.port = free_port()
        self.sock = workdir / "haproxy.sock"
        config = workdir / "haproxy.cfg"
        config.write_text(proxy_config((DEPLOY / "haproxy" / "haproxy.cfg").read_text(),
                                       self.port, servers, self.sock))
        check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True,
                               text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log = workdir / "haproxy.log"
        self.proc = subprocess.Popen([binary, "-db", "-f", str(config)],
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        wait_for(lambda: self.sock.exists() and self.states(), timeout=30)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.TextGenerationStub(self.channel)

    def states(self) -> dict[str, str]:
        """{server: UP/DOWN/...} from the stats socket."""
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(self.sock))
            c.sendall(b"show stat\n")
            data = b""
            while chunk := c.recv(65536):
                data += chunk
        rows = [line.split(",") for line in data.decode().splitlines()]
        return {r[1]: r[17].split()[0] for r in rows
                if len(r) > 17 and r[0] == "switchboard" and r[1] not in ("BACKEND", "FRONTEND")}

    def stop(self) -> None:
        self.channel.close()
        self.proc.terminate()
        self.proc.wait(10)


def generate(stub, adapter: str = "", *, header: str | None = None, n: int = 2):
    md = [("x-adapter-id", adapter)] if adapter else []
    if header is not None:
        md = [("x-adapter-id", header)]
    return stub.Generate(pb.GenerateRequest(
        adapter_id=adapter, prompt="hello",
        stopping=pb.StoppingCriteria(max_new_tokens=n, ignore_eos=True)),
        metadata=md, timeout=60)


class Fleet:
    def __init__(self, model: Path, adapters: Path, names: list[str]) -> None:
        self.args = ["--base-model", model, "--adapter-dir", adapters, "--metrics-port", "0",
                     "--max-connection-age", "30", "--grace-period", "5",
                     "--max-new-tokens", "4000", "--max-seq-len", "4096"]
        self.ports = {name: free_port() for name in names}
        self.replicas: dict[str, ServerProcess] = {}

    def start(self, *names: str) -> None:
        errors: list[BaseException] = []

        def run(name: str) -> None:
            try:
                self.replicas[name] = ServerProcess(
                    [*self.args, "--port", str(self.ports[name])])
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def served(self, adapter_label: str) -> dict[str, float]:
        """Requests each live replica has answered OK for `adapter_label`."""
        return {name: Scrape(r.metrics_port).v(REQUESTS, adapter=adapter_label, code="OK")
                for name, r in self.replicas.items() if r.proc.poll() is None}

    def running(self) -> dict[str, float]:
        return {name: Scrape(r.metrics_port).v("switchboard_requests_running")
                for name, r in self.replicas.items() if r.proc.poll() is None}

    def stop(self) -> None:
        for r in self.replicas.values():
            r.stop()


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


@pytest.fixture(scope="module")
def haproxy_bin() -> str:
    import shutil

    path = shutil.which("haproxy")
    if path is None:
        pytest.skip("`haproxy` not on PATH; install Debian's haproxy package "
                    "(`apt-get install -y haproxy`, as .ci/run does) to run this test")
    return path


@pytest.fixture(scope="module")
def fleet(haproxy_bin, tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("model"), max_positions=4096)
    adapters = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(ADAPTERS):
        make_lora(model, adapters / name, r=4, targets=["q_proj"], seed=i)
    f = Fleet(model, adapters, ["r1", "r2", "r3", "r4"])
    f.start("r1", "r2", "r3")  # r4 joins later
    proxy = Proxy(haproxy_bin, tmp_path_factory.mktemp("haproxy"), f.ports)
    f.proxy = proxy
    wait_for(lambda: proxy.states() == {"r1": "UP", "r2": "UP", "r3": "UP", "r4": "DOWN"},
             timeout=30)
    yield f
    proxy.stop()
    f.stop()


def homes(fleet, rounds: int = 3) -> dict[str, str]:
    """Sends `rounds` requests per adapter; -> {adapter: the one replica that served all}."""
    out = {}
    for adapter in ADAPTERS:
        before = fleet.served(adapter)
        for _ in range(rounds):
            assert generate(fleet.proxy.stub, adapter).completion_tokens == 2
        got = {k: v for k, v in delta(before, fleet.served(adapter)).items() if v}
        assert len(got) == 1 and list(got.values()) == [rounds], (adapter, got)
        out[adapter] = next(iter(got))
    return out


def test_each_adapter_sticks_to_one_replica(fleet):
    first = homes(fleet)
    assert len(set(first.values())) >= 2, first  # the ring spreads the adapters
    assert homes(fleet) == first  # and keeps them where they were
    fleet.first_homes = first


def test_base_requests_are_spread_over_every_replica(fleet):
    for header in (None, ""):  # no header (what the client sends) or an empty one
        before = fleet.served("__base__")
        for _ in range(9):
            assert generate(fleet.proxy.stub, header=header).completion_tokens == 2
        spread = delta(before, fleet.served("__base__"))
        assert sum(spread.values()) == 9
        assert all(v > 0 for v in spread.values()), (header, spread)


def test_a_hot_adapter_overflows_past_the_load_bound(fleet):
    hot = ADAPTERS[0]
    calls = [fleet.proxy.stub.GenerateStream(pb.GenerateRequest(
        adapter_id=hot, prompt="hello",
        stopping=pb.StoppingCriteria(max_new_tokens=4000, ignore_eos=True)),
        metadata=[("x-adapter-id", hot)], timeout=120) for _ in range(6)]
    try:
        for call in calls:
            next(call)  # every stream is running
        def all_running():
            r = fleet.running()
            return r if sum(r.values()) == 6 else None

        running = wait_for(all_running, timeout=60)
    finally:
        for call in calls:
            call.cancel()
    home = fleet.first_homes[hot]
    busy = {k for k, v in running.items() if v}
    assert len(busy) >= 2, running  # not all six on the hot adapter's replica
    assert running[home] < 6 and running[home] >= max(running.values()) - 1, running
    wait_for(lambda: sum(fleet.running().values()) == 0, timeout=60)


def test_killing_a_replica_moves_its_adapters_to_the_others(fleet):
    victim = Counter(fleet.first_homes.values()).most_common(1)[0][0]
    fleet.replicas[victim].proc.send_signal(signal.SIGKILL)
    fleet.replicas[victim].proc.wait(10)
    wait_for(lambda: fleet.proxy.states()[victim] == "DOWN", timeout=30)
    after = homes(fleet)  # every request answered, each adapter on one live replica
    assert victim not in after.values()
    for adapter, home in fleet.first_homes.items():
        if home != victim:
            assert after[adapter] == home, adapter  # only the victim's adapters moved
    before = fleet.served("__base__")
    for _ in range(6):
        generate(fleet.proxy.stub)
    assert sum(delta(before, fleet.served("__base__")).values()) == 6


def test_a_replica_added_later_receives_traffic(fleet):
    fleet.start("r4")
    wait_for(lambda: fleet.proxy.states()["r4"] == "UP", timeout=30)
    before = fleet.served("__base__")
    for _ in range(8):
        generate(fleet.proxy.stub)
    assert delta(before, fleet.served("__base__"))["r4"] > 0
