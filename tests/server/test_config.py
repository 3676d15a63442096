"""Every configuration field has a flag and every flag a field (server.config generates the
flags from the fields' metadata), every flag sets exactly its fields, the flags' defaults
are the dataclasses' defaults, and parsing flags imports no torch."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from server.config import EXTRA_FLAGS, ServerConfig, add_serve_arguments, config_from_args, settings

# field (dotted path in ServerConfig) <- the flags that set it to a value other than its default
FLAGS: dict[str, list[str]] = {
    "host": ["--host", "127.0.0.2"],
    "port": ["--port", "5"],
    "metrics_host": ["--metrics-host", "127.0.0.3"],
    "metrics_port": ["--metrics-port", "7"],
    "http_host": ["--http-host", "127.0.0.4"],
    "http_port": ["--http-port", "8000"],
    "base_model": ["--base-model", "some-model"],
    "adapter_dir": ["--adapter-dir", "elsewhere"],
    "quantize": ["--quantize", "int8"],  # and engine.quantize: one flag, two readers
    "preload": ["--preload", "a,b"],
    "watch_seconds": ["--watch", "2"],
    "engine.device": ["--device", "cpu"],
    "engine.dtype": ["--dtype", "float32"],
    "engine.adapter_dtype": ["--adapter-dtype", "bfloat16"],
    "engine.max_batch_size": ["--max-batch-size", "3"],
    "engine.max_tokens_per_step": ["--max-tokens-per-step", "64"],
    "engine.max_queue": ["--max-queue", "9"],
    "engine.max_seq_len": ["--max-seq-len", "100"],
    "engine.kv_cache_bytes": ["--kv-cache-memory", "1GiB"],
    "engine.prefix_cache_bytes": ["--prefix-cache-memory", "64MiB"],
    "engine.prepack_weights": ["--prepack-weights", "on"],
    "engine.max_active_adapters": ["--max-active-adapters", "4"],
    "engine.max_lora_rank": ["--max-lora-rank", "32"],
    "engine.lora_slots": ["--lora-slots", "8:4,32:1"],
    "engine.max_host_adapter_bytes": ["--max-host-adapter-memory", "1GiB"],
    "engine.allow_pickle": ["--allow-pickle"],
    "engine.threads": ["--threads", "1"],
    "engine.cpu_kernels": ["--cpu-kernels", "native"],
    "limits.max_new_tokens": ["--max-new-tokens", "300"],
    "limits.default_max_new_tokens": ["--default-max-new-tokens", "100"],
    "limits.max_stop_sequences": ["--max-stop-sequences", "2"],
    "limits.max_stop_sequence_chars": ["--max-stop-sequence-chars", "9"],
    "limits.max_prompt_chars": ["--max-prompt-chars", "99"],
    "limits.max_prompt_tokens": ["--max-prompt-tokens", "16"],
    "limits.max_response_format_chars": ["--max-response-format-chars", "1000"],
    "limits.max_message_bytes": ["--max-message-size", "64KiB"],
    "limits.max_concurrent_per_key": ["--max-concurrent-per-key", "2"],
    "limits.retry_after_ms": ["--retry-after-ms", "250"],
    "security.api_keys": ["--api-keys", "keys.yaml"],
    "security.allow_insecure_bind": ["--allow-insecure-bind"],
    "security.output_policy": ["--output-policy", "policy.yaml"],
    "enable_admin": ["--enable-admin"],
    "grpc_workers": ["--grpc-workers", "8"],
    "grace_period": ["--grace-period", "3"],
    "max_connection_age": ["--max-connection-age", "60"],
    "limits.max_request_seconds": ["--max-request-time", "30"],
    "onnx.enabled": ["--onnx"],
    "onnx.variant": ["--onnx-variant", "int8"],
    "onnx.threads": ["--onnx-threads", "2"],
    "onnx.provider": ["--onnx-provider", "cpu"],
    "onnx.memory_bytes": ["--onnx-memory", "1GiB"],
}
# flags that set several fields together (they only make sense so)
COUPLED: list[tuple[list[str], set[str]]] = [
    (["--quantize", "int8"], {"quantize", "engine.quantize"}),
    (["--tls-cert", "c.pem", "--tls-key", "k.pem"], {"security.tls_cert", "security.tls_key"}),
    (["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem"],
     {"security.tls_cert", "security.tls_key", "security.tls_client_ca"}),
    (["--onnx-adapters", "a,b"], {"onnx.enabled", "onnx.adapters"}),
]


def _leaves(obj, prefix: str = "") -> dict[str, object]:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_leaves(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def _config(args: list[str]) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return _leaves(config_from_args(parser.parse_args(args)))


def test_defaults_of_the_flags_are_the_dataclasses_defaults(monkeypatch):
    monkeypatch.delenv("SWITCHBOARD_CPU_KERNELS", raising=False)
    assert _config([]) == _leaves(ServerConfig())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser


def test_every_field_has_a_flag_and_every_flag_a_field():
    fields_ = {".".join(s.path): s.name for s in settings()}
    assert set(fields_) == set(_leaves(ServerConfig()))
    declared = [s.name for s in settings() if not s.flag.reads]
    assert len(declared) == len(set(declared)), "two fields declare the same flag"
    assert set(fields_.values()) <= set(declared), "a field reads a flag nobody declares"
    flags = {o for a in _parser()._actions for o in a.option_strings} - {"-h", "--help"}
    assert flags == set(declared) | {name for name, _ in EXTRA_FLAGS}


def test_a_field_without_a_flag_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Forgotten:
        knob: int = 3

    with pytest.raises(TypeError, match="Forgotten.knob has no flag"):
        settings(Forgotten)


def test_the_checks_of_single_fields_name_the_flag():
    checked = [s for s in settings() if s.flag.minimum is not None]
    assert len(checked) > 10
    for s in checked:
        with pytest.raises(SystemExit, match=f"^error: {s.name} must "):
            _server_config([s.name, str(s.flag.minimum - 1)])
        _server_config([s.name, str(s.flag.minimum)])


def test_the_environment_sets_the_cpu_kernels_default(monkeypatch):
    monkeypatch.setenv("SWITCHBOARD_CPU_KERNELS", "torch")
    assert _server_config([]).engine.cpu_kernels == "torch"
    assert "default torch" in " ".join(_parser().format_help().split())
    assert _server_config(["--cpu-kernels", "native"]).engine.cpu_kernels == "native"


def test_the_default_new_tokens_stay_within_the_limit():
    assert _server_config(["--max-new-tokens", "100"]).limits.default_max_new_tokens == 100
    assert _server_config(["--max-new-tokens", "300"]).limits.default_max_new_tokens == 256


def test_the_sample_flags_below_cover_every_field():
    set_together = set().union(*(fields for _, fields in COUPLED))
    assert set(_leaves(ServerConfig())) == set(FLAGS) | set_together


@pytest.mark.parametrize("args,fields",
                         [(a, {f} if f != "quantize" else {"quantize", "engine.quantize"})
                          for f, a in FLAGS.items()] + COUPLED,
                         ids=[*FLAGS, *(" ".join(a) for a, _ in COUPLED)])
def test_each_flag_sets_exactly_its_fields(args, fields, monkeypatch):
    monkeypatch.delenv("SWITCHBOARD_CPU_KERNELS", raising=False)
    default, got = _config([]), _config(args)
    assert {k for k in got if got[k] != default[k]} == fields


def test_parsing_flags_imports_no_torch():
    code = ("import sys, argparse; from server.config import add_serve_arguments, "
            "config_from_args; p = argparse.ArgumentParser(); add_serve_arguments(p); "
            "config_from_args(p.parse_args([])); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


def _server_config(args: list[str]) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return config_from_args(parser.parse_args(args))


def test_the_drain_follows_the_longest_request_unless_set():
    assert _server_config([]).drain_seconds == 300 + 5
    assert _server_config(["--max-request-time", "120"]).drain_seconds == 125
    assert _server_config(["--max-request-time", "120", "--grace-period", "3"]).drain_seconds == 3
    with pytest.raises(SystemExit, match="--max-request-time must be more than 0"):
        _server_config(["--max-request-time", "0"])


def test_lora_slots_are_parsed_and_checked_against_the_rank_cap(capsys):
    assert _server_config(["--lora-slots", "8:16, 32:2,128:1"]).engine.lora_slots == (
        (8, 16), (32, 2), (128, 1))
    for bad, why in [("8:16,8:2", "distinct and in ascending order"),
                     ("32:2,8:16", "distinct and in ascending order"),
                     ("8:0", "'8:0' is not RANK:SLOTS"), ("8", "'8' is not RANK:SLOTS")]:
        with pytest.raises(SystemExit):
            _server_config(["--lora-slots", bad])
        assert why in capsys.readouterr().err
    with pytest.raises(SystemExit, match="rank 64, greater than --max-lora-rank 32"):
        _server_config(["--lora-slots", "8:4,64:1", "--max-lora-rank", "32"])
