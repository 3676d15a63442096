"""Which package may import which (docs/architecture.md, "Import rules"), enforced on the
imports of every .py file of ours, module-level and inside functions alike."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("adapter_format", "textguard", "clients", "trainer", "server")
OURS = PACKAGES

# (importer prefix, forbidden prefix, allowed exceptions within the forbidden prefix, why)
# A module matches a prefix when it is the prefix or lies under it. The same table is in
# docs/architecture.md.
# the model layer of the server: the decoder, its ops, its weight formats, its loading
MODEL = ("server.engine.model", "server.engine.ops", "server.engine.quant",
         "server.engine.nf4", "server.engine.loading")
RULES: list[tuple[str, str, tuple[str, ...], str]] = [
    ("adapter_format", "server", (), "the artifact contract sits below server and trainer"),
    ("adapter_format", "trainer", (), "the artifact contract sits below server and trainer"),
    ("adapter_format", "clients", (), "the artifact contract sits below server and trainer"),
    ("textguard", "server", (), "textguard is pure Python, below everything"),
    ("textguard", "trainer", (), "textguard is pure Python, below everything"),
    ("textguard", "adapter_format", (), "textguard is pure Python, below everything"),
    ("textguard", "clients", (), "textguard is pure Python, below everything"),
    ("clients", "server", (), "clients speak only the switchboard/v1 protocol"),
    ("clients", "trainer", (), "clients speak only the switchboard/v1 protocol"),
    ("server", "trainer", (), "the server never needs the trainer"),
    ("server", "clients", (), "the server never needs the clients"),
    ("trainer", "server", ("server.model_store", "server.onnx.graph", "server.onnx.session"),
     "the trainer uses the server only to find models and to build/check ONNX graphs"),
    ("server.config", "server.engine", (), "parsing flags must not import torch"),
    ("server.config", "server.onnx", (), "parsing flags must not import torch"),
    ("server.config", "server.adapters", (), "parsing flags must not import torch"),
    ("server.scheduler", "server.engine", (), "the queue knows no engine"),
    ("server.scheduler", "server.adapters", (), "the queue knows no engine"),
    ("server.scheduler", "server.onnx", (), "the queue knows no engine"),
    *((m, "server.engine", MODEL, "the model layer is below the engine") for m in MODEL),
    *((m, "server.adapters", (), "the model layer is below the adapters") for m in MODEL),
    ("server.adapters", "server.engine", MODEL,
     "adapters sit on the model layer, below the engine (no engine <-> adapters cycle)"),
    ("server.engine", "server.onnx", (), "the ONNX backend builds on the engine, not back"),
]
for _low in ("server.engine", "server.adapters", "server.onnx", "server.scheduler",
             "server.security", "adapter_format", "textguard"):
    for _high in ("server.api", "server.app", "server.cli"):
        RULES.append((_low, _high, (), "the API and the app assemble the layers below"))


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) of every import statement anywhere in the source, relative
    ones resolved; `from X import y` counts as X.y when X is a package (y may be a module)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if (ROOT / target.replace(".", "/")).is_dir():  # a package: names may be modules
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


def violations(source: str, module: str, filename: str, is_package: bool = False) -> list[str]:
    out = []
    for line, target in imports(source, module, is_package):
        if target.split(".")[0] not in OURS:
            continue
        for importer, forbidden, allowed, why in RULES:
            if (_under(module, importer) and _under(target, forbidden)
                    and not any(_under(target, a) for a in allowed)):
                out.append(f"{filename}:{line}: {module} imports {target} ({why})")
                break
    return out


def _files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_package_follows_the_import_rules():
    found = []
    for path in _files():
        found += violations(path.read_text(), module_name(path),
                            str(path.relative_to(ROOT)), path.name == "__init__.py")
    assert not found, "forbidden imports:\n" + "\n".join(found)


def test_the_rules_see_every_package():
    assert len(_files()) > 50
    for pkg in PACKAGES:
        assert (ROOT / pkg / "__init__.py").is_file(), pkg


@pytest.mark.parametrize("module,source,expected", [
    ("server.engine.engine", "import torch\n\ndef f():\n    from server.api import servicer\n",
     "x.py:4: server.engine.engine imports server.api"),
    ("server.adapters.lora", "from server.engine.step import pack_step\n",
     "x.py:1: server.adapters.lora imports server.engine.step"),
    ("server.adapters.lora", "from server.engine import engine\n",
     "x.py:1: server.adapters.lora imports server.engine"),
    ("adapter_format.manifest", "if True:\n    import trainer.train\n",
     "x.py:2: adapter_format.manifest imports trainer.train"),
    ("trainer.cli", "def g():\n    from server.onnx.router import EngineRouter\n",
     "x.py:2: trainer.cli imports server.onnx.router"),
    ("server.engine.model", "from . import step\n",
     "x.py:1: server.engine.model imports server.engine.step"),
    ("server.engine.loading", "from server.adapters.lora import LoraWeights\n",
     "x.py:1: server.engine.loading imports server.adapters.lora"),
    ("server.config", "from server.engine.engine import Engine\n",
     "x.py:1: server.config imports server.engine.engine"),
])
def test_a_forbidden_import_is_named_with_file_and_line(module, source, expected):
    found = violations(source, module, "x.py")
    assert found and found[0].startswith(expected), found


@pytest.mark.parametrize("module,source", [
    ("server.adapters.lora", "from server.engine.model import ModelSpec\n"),
    ("trainer.merge", "from server.model_store import resolve\n"),
    ("server.engine.step", "from server.adapters import hooks\n"),
    ("server.engine.model", "from server.engine.quant import MODES\n"),
    ("server.engine.loading", "from server.engine.nf4 import quantize_nf4\n"),
    ("server.onnx.router", "from adapter_format.manifest import read_manifest\n"),
])
def test_an_allowed_import_passes(module, source):
    assert violations(source, module, "x.py") == []


def test_docs_show_the_same_table():
    rows = set()
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        cells = line.split("|")[1:-1]
        if len(cells) == 4 and "`" in cells[0]:
            names = [set(c.replace("`", "").replace(" ", "").split(",")) for c in cells[:3]]
            rows |= {(i, f, tuple(sorted(names[2] - {""})))
                     for i in names[0] for f in names[1]}
    for importer, forbidden, allowed, _ in RULES:
        assert (importer, forbidden, tuple(sorted(allowed))) in rows, (importer, forbidden)
    assert len(rows) == len(RULES), "docs/architecture.md has rules the test lacks"
