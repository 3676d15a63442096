"""The adapter loader's own safetensors reader: the same tensors as the safetensors
library, every malformed header refused with AdapterError, and the one-op-per-run
finiteness check exact (NaN or Inf in any tensor is found and named; huge finite values
that overflow the check's sum are accepted)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.adapters.lora import AdapterError, read_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(7, 3, generator=g),
        "a.weight": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(2, 2, generator=g).half(),
        "d.index": torch.arange(6, dtype=torch.int64).view(2, 3),
        "e.empty": torch.empty(0, 4),
        "f.scalar": torch.tensor(3.5, dtype=torch.float64),
        "g.mask": torch.tensor([True, False, True]),
    }


def _raw(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def test_same_tensors_as_the_safetensors_library(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), str(path), metadata={"format": "pt"})
    ours, ref = read_safetensors(path), load_file(str(path))
    assert ours.keys() == ref.keys()
    for key, t in ref.items():
        assert ours[key].dtype == t.dtype and ours[key].shape == t.shape, key
        assert torch.equal(ours[key], t), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_in_any_tensor_is_named(tmp_path, dtype, bad):
    tensors = {f"t{i}": torch.randn(4, 3).to(dtype) for i in range(5)}
    tensors["t3"][2, 1] = bad
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(AdapterError, match="tensor 't3' contains NaN or Inf"):
        read_safetensors(path)


def test_huge_finite_values_are_accepted(tmp_path):
    """Their sum overflows to Inf in fp32; the per-tensor look finds nothing wrong."""
    big = torch.full((64,), 3e38)
    path = tmp_path / "m.safetensors"
    save_file({"big": big, "small": torch.ones(3)}, str(path))
    assert torch.equal(read_safetensors(path)["big"], big)


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("content, why", [
    (b"", "shorter than the 8-byte header length"),
    (struct.pack("<Q", 10_000) + b"{}", "header length 10000 exceeds"),
    (struct.pack("<Q", 4) + b"{{{{", "header is not JSON"),
    (_raw([1, 2], b""), "header is not a JSON object"),
    (_raw({"x": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
     "tensor 'x': bad header entry"),
    (_raw({"x": {"dtype": "F32", "shape": [2]}}, bytes(8)), "tensor 'x': bad header entry"),
    (_raw({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
     "does not fit data offsets"),
    (_raw({"x": F32}, bytes(4)), "does not fit data offsets"),
    (_raw({"x": {**F32, "shape": [-2]}}, bytes(8)), "does not fit data offsets"),
    (_raw({"x": F32, "y": F32}, bytes(16)), "overlaps another or leaves a gap"),
    (_raw({"x": {**F32, "data_offsets": [4, 12]}}, bytes(12)), "leaves a gap"),
    (_raw({"x": F32}, bytes(12)), "4 data bytes belong to no tensor"),
])
def test_malformed_files_are_refused_with_the_reason(tmp_path, content, why):
    path = tmp_path / "m.safetensors"
    path.write_bytes(content)
    with pytest.raises(AdapterError, match="corrupt or truncated") as err:
        read_safetensors(path)
    assert why in str(err.value)


def test_every_truncation_of_a_real_file_is_refused(tmp_path):
    whole = tmp_path / "whole.safetensors"
    save_file(_tensors(), str(whole))
    data = whole.read_bytes()
    cut = tmp_path / "cut.safetensors"
    for size in range(0, len(data), 7):
        cut.write_bytes(data[:size])
        with pytest.raises(AdapterError):
            read_safetensors(cut)


def test_filesystems_without_o_direct_are_read_buffered(tmp_path, monkeypatch):
    """O_DIRECT refused (EINVAL, as some filesystems answer): the same tensors, read
    through the page cache; any other error is not hidden."""
    import errno
    import os

    path = tmp_path / "m.safetensors"
    save_file(_tensors(), str(path))
    real_open, flags_seen = os.open, []

    def no_direct(p, flags, *a):
        flags_seen.append(flags)
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    ours, ref = read_safetensors(path), load_file(str(path))
    assert [bool(f & os.O_DIRECT) for f in flags_seen] == [True, False]
    assert all(torch.equal(ours[k], ref[k]) for k in ref)

    def denied(p, flags, *a):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(PermissionError):
        read_safetensors(path)
