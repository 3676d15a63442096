"""AdapterLoader's checks on the adapter root, without reading weights: which directories
a scan sees, ids, paths inside the root, the manifest's base fingerprint, the config
summary and the file signature (AdapterRegistry's errors, word for word)."""
from __future__ import annotations

import json
import os

import pytest
from support import TINY_SPEC as SPEC

from adapter_format.manifest import MANIFEST_NAME
from server.adapters.loader import AdapterLoader, check_id, signature, summary
from server.adapters.lora import AdapterError


def lora_dir(path, r=4, targets=("q_proj", "v_proj")):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets)}))
    return path


@pytest.fixture
def root(tmp_path):
    lora_dir(tmp_path / "b")
    lora_dir(tmp_path / "a")
    lora_dir(tmp_path / ".a.tmp-1")  # an artifact being written: hidden
    (tmp_path / "empty").mkdir()  # no config file
    (tmp_path / "file.txt").write_text("x")
    return tmp_path


def loader(root) -> AdapterLoader:
    return AdapterLoader(root, SPEC, "fp")


def test_scan_sees_adapter_directories_only_sorted(root):
    assert [p.name for p in loader(root).adapter_dirs()] == ["a", "b"]
    assert loader(root / "missing").adapter_dirs() == []


def test_check_returns_path_method_and_no_policy(root):
    checked = loader(root).check("x", "a")
    assert checked.path == (root / "a").resolve() and checked.method == "lora"
    assert checked.policy is None
    assert summary(checked) == (4, ["q_proj", "v_proj"])


@pytest.mark.parametrize("adapter_id", ["", ".hidden", "a/b", "x" * 129])
def test_invalid_ids(adapter_id):
    with pytest.raises(AdapterError, match="is invalid"):
        check_id(adapter_id)


def test_paths_must_be_directories_inside_the_root(root, tmp_path_factory):
    ld = loader(root)
    outside = lora_dir(tmp_path_factory.mktemp("elsewhere") / "z")
    os.symlink(outside, root / "link")
    with pytest.raises(AdapterError, match="path is empty"):
        ld.resolve_path("")
    with pytest.raises(AdapterError, match="resolves outside the adapter root"):
        ld.check("z", str(outside))
    with pytest.raises(AdapterError, match="resolves outside the adapter root"):
        ld.check("link")  # a symlink out of the root
    with pytest.raises(AdapterError, match="is not a directory under"):
        ld.check("file", "file.txt")
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        ld.check("empty")


def test_manifest_for_another_base_is_refused(root):
    (root / "a" / MANIFEST_NAME).write_text(json.dumps(
        {"base_model": {"fingerprint": "other"}}))
    with pytest.raises(AdapterError, match="adapter 'a' was trained for base fingerprint "
                       "other, this server runs fp"):
        loader(root).check("a")
    (root / "a" / MANIFEST_NAME).write_text(json.dumps({"base_model": {"fingerprint": "fp"}}))
    assert loader(root).check("a").method == "lora"
    (root / "a" / MANIFEST_NAME).write_text("[")
    with pytest.raises(AdapterError, match=f"adapter 'a': .*unreadable {MANIFEST_NAME}"):
        loader(root).check("a")


def test_signature_changes_with_the_files(root):
    before = signature(root / "a")
    assert [name for name, *_ in before] == ["adapter_config.json"]
    (root / "a" / "adapter_model.safetensors").write_bytes(b"12")
    after = signature(root / "a")
    assert after != before and after[1][:2] == ("adapter_model.safetensors", 2)


def test_read_without_a_pool_reads_into_fresh_memory(tiny_model, tmp_path):
    from support import make_lora
    make_lora(tiny_model, tmp_path / "a", r=4, targets=["q_proj"], seed=0)
    method, weights = AdapterLoader(tmp_path, SPEC, "fp").read(tmp_path / "a")
    assert method == "lora" and weights.rank == 4 and weights.target_modules == ["q_proj"]
