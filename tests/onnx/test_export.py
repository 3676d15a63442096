"""`trainer export-onnx`: merge, export, quantize, parity, manifest; refused cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.onnx_export import ExportError, ParityConfig, ParityError, export_onnx


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def test_fp32_and_int8_exports_are_recorded_with_parity(exported_root):
    from adapter_format.manifest import adapter_content_hash

    manifest = json.loads((exported_root / "hot" / "switchboard.json").read_text())
    exports = manifest["exports"]["onnx"]
    assert set(exports) == {"fp32", "int8"}
    fp32, int8 = exports["fp32"], exports["int8"]
    for rec in (fp32, int8):
        assert (exported_root / "hot" / rec["path"]).is_file()
        assert rec["adapter_hash"] == adapter_content_hash(exported_root / "hot")
        assert rec["parity"]["passed"] and rec["parity"]["greedy_tokens"] >= 64
    assert fp32["parity"]["greedy_agreement"] == 1.0
    assert fp32["parity"]["max_abs_logit_diff"] < 1e-3
    assert int8["parity"]["greedy_agreement"] >= 0.95
    assert int8["size_bytes"] < fp32["size_bytes"]
    # nothing left behind but the exports
    assert not [p for p in (exported_root / "hot").iterdir() if p.name.startswith(".")]


def test_failed_parity_leaves_the_adapter_as_it_was(adapter_copy):
    before = _snapshot(adapter_copy)
    with pytest.raises(ParityError, match="parity check failed.*unchanged"):
        export_onnx(adapter_copy, parity=ParityConfig(new_tokens=2, max_logit_diff=-1.0))
    assert _snapshot(adapter_copy) == before
    assert not [p for p in adapter_copy.iterdir() if p.name.startswith(".")]


def _write(path: Path, config: dict, manifest: dict | None = None) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(config))
    if manifest is not None:
        (path / "switchboard.json").write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize(("config", "manifest", "message"), [
    ({"peft_type": "PROMPT_TUNING"}, None, "virtual tokens are not a weight delta"),
    ({"peft_type": "PREFIX_TUNING"}, {"method": "prefix_tuning"}, "cannot be merged"),
    ({"peft_type": "LORA"}, {"method": "lora", "training_method": "qlora",
                             "base_model": {"quantization": "nf4"}}, "4-bit"),
    ({"peft_type": "LORA"}, {"method": "bottleneck", "training_method": "adapter"},
     "only lora and ia3"),
])
def test_unmergeable_adapters_are_refused(tmp_path, onnx_model, config, manifest, message):
    adapter = _write(tmp_path / "a", {**config, "base_model_name_or_path": str(onnx_model)},
                     manifest)
    before = _snapshot(adapter)
    with pytest.raises(ExportError, match=message):
        export_onnx(adapter)
    assert _snapshot(adapter) == before


def test_quantized_base_is_refused(tmp_path, onnx_model, adapter_copy):
    import shutil

    base = Path(shutil.copytree(onnx_model, tmp_path / "base4"))
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="quantized"):
        export_onnx(adapter_copy, base_model=str(base))


def test_cli_reports_refusal_with_exit_code_2(tmp_path, onnx_model, capsys):
    from trainer.cli import main

    adapter = _write(tmp_path / "p", {"peft_type": "P_TUNING",
                                      "base_model_name_or_path": str(onnx_model)})
    assert main(["export-onnx", str(adapter), "--quantize", "int8"]) == 2
    assert "cannot export a p_tuning adapter" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export-onnx", str(adapter), "--quantize", "int3"])
