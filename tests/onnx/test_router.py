"""One `Engine` protocol (server/engine/protocol.py) for the PyTorch engine, the ONNX
engine and the router between them; the router loads ONNX sessions on its loader thread,
never on the thread of the request that needs one, and holds no other request up
meanwhile. In process, over the real engines, the tiny model and its exported LoRA."""

from __future__ import annotations

import ast
import threading
import time
import typing

import pytest
from support import REPO, wait_for

from server.config import EngineConfig, OnnxConfig
from server.engine.engine import Engine as PyTorchEngine
from server.engine.engine import load_engine_adapters
from server.engine.protocol import Engine, EngineHealth, EngineInfo, Route
from server.engine.types import (
    EngineError,
    EnginePath,
    FinishEvent,
    GenerationRequest,
    RequestHandle,
    StoppingParams,
    TokenEvent,
)
from server.onnx.engine import OnnxEngine, OnnxEngineConfig
from server.onnx.router import EngineRouter
from server.onnx.session import OnnxDecoderSession

PROMPT = [1, 504, 2134, 28, 9043, 314, 7]
ENGINE_CONFIG = EngineConfig(device="cpu", dtype="float32", max_batch_size=4,
                             max_tokens_per_step=64, max_seq_len=128, kv_cache_bytes=16 << 20,
                             max_active_adapters=2, max_lora_rank=8, threads=1,
                             cpu_kernels="torch")


def _request(rid: str, adapter: str, n: int = 8, **kw) -> GenerationRequest:
    return GenerationRequest(rid, list(PROMPT), adapter_id=adapter,
                             stopping=StoppingParams(n, ignore_eos=True), **kw)


def _tokens(handle: RequestHandle) -> list[int]:
    ids = []
    while True:
        ev = handle.events.get(timeout=60)
        if isinstance(ev, TokenEvent):
            ids += ev.token_ids
        elif isinstance(ev, FinishEvent):
            return ids
        else:
            raise AssertionError(ev)


@pytest.fixture(scope="module")
def pytorch(onnx_model, exported_root):
    engine = PyTorchEngine(onnx_model, exported_root, ENGINE_CONFIG)
    assert load_engine_adapters(engine) == []
    return engine


@pytest.fixture(scope="module")
def sessions() -> list[str]:
    """The threads ONNX sessions were opened on (every session this module opens, the
    router's and the tests' own)."""
    return []


@pytest.fixture(scope="module")
def gate() -> threading.Event:
    """Cleared: a session being opened waits (its load stays under way) until it is set."""
    event = threading.Event()
    event.set()
    return event


@pytest.fixture(scope="module")
def router(pytorch, sessions, gate):
    original = OnnxDecoderSession.__init__

    def observed(self, *args, **kw):  # the real session, its thread noted
        sessions.append(threading.current_thread().name)
        assert gate.wait(60)
        original(self, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(OnnxDecoderSession, "__init__", observed)
        router = EngineRouter(pytorch, OnnxConfig(enabled=True, variant="fp32", threads=1))
        router.start()  # loads `hot`'s session (and waits for it)
        yield router
        router.stop()


def test_every_engine_satisfies_the_protocol(router, pytorch, exported_root, onnx_model):
    from transformers import AutoTokenizer

    onnx = OnnxEngine(exported_root / "hot" / "onnx" / "fp32" / "model.onnx",
                      AutoTokenizer.from_pretrained(onnx_model), set(), 128,
                      OnnxEngineConfig(threads=1, max_batch_size=2), adapter_id="hot",
                      variant="fp32", fingerprint=pytorch.fingerprint)
    assert onnx.health() == EngineHealth(False, "the onnx engine has not started")
    onnx.start()
    try:
        cases = [(pytorch, "cold", "pytorch"), (onnx, "hot", "onnx"), (router, "hot", "onnx"),
                 (router, "cold", "pytorch")]
        for i, (engine, adapter, path) in enumerate(cases):
            assert isinstance(engine, Engine), type(engine)
            assert engine.health() == EngineHealth(True)
            info = engine.info()
            assert isinstance(info, EngineInfo) and info.fingerprint == pytorch.fingerprint
            assert (info.vocab_size, info.max_seq_len, info.dtype) == (49152, 128, "float32")
            assert info.device == "cpu" and info.max_batch_size == (2 if engine is onnx else 4)
            assert engine.route(adapter).path == path
            memory = engine.memory()
            assert all(isinstance(v, int) and v >= 0 for v in memory.values())
            assert memory.get("base_model", 0) + memory.get("onnx_sessions", 0) > 0
            handle = engine.submit(_request(f"case-{i}", adapter))
            assert handle.engine_path == path and handle.adapter_id == adapter
            assert len(_tokens(handle)) == 8
            engine.warmup()
        assert router.memory()["onnx_sessions"] == onnx.memory()["onnx_sessions"]
        assert router.info() == pytorch.info()
        assert router.route("hot") == Route("onnx", "fp32")
        assert router.route("cold") == Route("pytorch", "", "no ONNX export")
    finally:
        onnx.stop()
    assert onnx.health() == EngineHealth(False, "the onnx engine is stopped")
    assert typing.get_type_hints(RequestHandle)["engine_path"] == EnginePath
    with pytest.raises(ValueError, match="engine_path 'tensorrt' is not one of pytorch, onnx"):
        RequestHandle("r", "", "", "tensorrt")


def test_each_engine_refuses_a_path_it_does_not_have(router, pytorch):
    with pytest.raises(EngineError) as e:
        pytorch.submit(_request("p", "cold"), engine_path="onnx")
    assert e.value.code == "FAILED_PRECONDITION" and "--onnx" in str(e.value)
    with pytest.raises(EngineError) as e:
        router.submit(_request("r", "cold"), engine_path="onnx")
    assert e.value.code == "FAILED_PRECONDITION" and "no ONNX export" in str(e.value)
    with pytest.raises(EngineError) as e:
        router.submit(_request("x", "cold"), engine_path="tpu")
    assert e.value.code == "INVALID_ARGUMENT" and "engine_path 'tpu'" in str(e.value)
    with pytest.raises(EngineError) as e:
        router.submit(_request("m", "missing"))
    assert e.value.code == "NOT_FOUND"


def test_the_handle_names_the_path_that_served_it(router):
    """Routed, `hot` goes to its ONNX session; insisting on PyTorch gives the same greedy
    tokens (fp32 export of the merged adapter) from the PyTorch engine."""
    onnx = router.submit(_request("a", "hot", 12))
    torch = router.submit(_request("b", "hot", 12), engine_path="pytorch")
    cold = router.submit(_request("c", "cold", 12))
    assert (onnx.engine_path, torch.engine_path, cold.engine_path) == ("onnx", "pytorch",
                                                                       "pytorch")
    assert _tokens(onnx) == _tokens(torch)
    assert len(_tokens(cold)) == 12


def test_a_session_loads_on_the_loader_thread_and_holds_up_no_other_request(
        router, pytorch, sessions, gate):
    assert sessions[0].startswith("onnx-loader")  # `hot`'s, at start (router.start())
    opened = len(sessions)
    pytorch.registry.load("hot2", "hot")  # a new adapter id with the same export
    assert router.route("hot2") == Route("onnx", "fp32", "not loaded yet")
    gate.clear()  # the session about to open stays loading until the gate opens
    got: dict = {}
    request = threading.Thread(target=lambda: got.update(handle=router.submit(
        _request("first", "hot2", 12))), name="request-thread")
    try:
        request.start()
        wait_for(lambda: len(sessions) > opened)
        assert sessions[opened].startswith("onnx-loader")
        assert router.route("hot2") == Route("onnx", "fp32", "loading")
        # meanwhile: other adapters are served, the router's state can be read
        assert len(_tokens(router.submit(_request("cold", "cold")))) == 8
        assert len(_tokens(router.submit(_request("hot", "hot")))) == 8
        assert router.memory()["onnx_sessions"] > 0
        with pytest.raises(EngineError) as e:  # a deadline that passes while it loads
            router.submit(_request("late", "hot2", deadline=time.monotonic() + 0.2))
        assert e.value.code == "DEADLINE_EXCEEDED" and "was loading" in str(e.value)
        assert request.is_alive() and not got  # the first request waits for its session
    finally:
        gate.set()
    request.join(60)
    handle = got["handle"]
    assert handle.engine_path == "onnx" and len(sessions) == opened + 1
    assert router.route("hot2") == Route("onnx", "fp32")
    want = _tokens(router.submit(_request("ref", "hot2", 12), engine_path="pytorch"))
    assert _tokens(handle) == want
    pytorch.registry.unload("hot2")


def test_a_new_version_gets_a_new_session_and_the_old_one_drains(router, pytorch, sessions):
    """A request running on version 1's session finishes there while version 2's session
    loads (off the request thread) and serves the requests after it."""
    pytorch.registry.load("swap", "hot")
    first = router.submit(_request("v1", "swap", 60))
    assert isinstance(first.events.get(timeout=60), TokenEvent)
    opened = len(sessions)
    entry, replaced = pytorch.registry.load("swap", "hot")
    assert replaced
    second = router.submit(_request("v2", "swap", 8))
    assert second.engine_path == "onnx" and second.adapter_version == entry.version
    assert first.adapter_version != second.adapter_version
    assert len(sessions) == opened + 1 and sessions[-1].startswith("onnx-loader")
    assert len(_tokens(second)) == 8
    rest = _tokens(first)
    assert len(rest) == 59
    ev = router.submit(_request("after", "swap", 2))
    assert ev.adapter_version == entry.version and len(_tokens(ev)) == 2
    pytorch.registry.unload("swap")


def test_a_stopped_engine_reports_it(onnx_model, exported_root):
    """health() follows the engine thread: not before start, not after stop."""
    engine = PyTorchEngine(onnx_model, exported_root, ENGINE_CONFIG)
    router = EngineRouter(engine, OnnxConfig(enabled=False))
    assert not router.health().ok and "not started" in router.health().detail
    router.start()
    assert router.health() == EngineHealth(True)
    h = router.submit(_request("one", ""))
    assert len(_tokens(h)) == 8 and h.engine_path == "pytorch"
    router.stop()
    assert router.health() == EngineHealth(False, "the pytorch engine is stopped")


def test_the_apis_use_the_protocol_and_nothing_else():
    """No duck typing on engines: server/api and server/app.py use only what the protocol
    declares of an engine, never hasattr/getattr on one; the router forwards nothing."""
    assert "__getattr__" not in vars(EngineRouter)
    declared = {n for n in vars(Engine) if not n.startswith("_")} | set(Engine.__annotations__)
    sources = [*sorted((REPO / "server" / "api").glob("*.py")), REPO / "server" / "app.py"]
    used = set()
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("hasattr",
                                                                               "getattr"):
                assert "engine" not in ast.unparse(node.args[0]), ast.unparse(node)
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) in ("engine",
                                                                              "self.engine"):
                assert node.attr in declared, f"{path.name}: {ast.unparse(node)}"
                used.add(node.attr)
    assert used == declared  # and the protocol declares nothing they do not use
