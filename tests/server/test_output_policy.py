"""Output policies against a real server process: a LoRA trained here (on the tiny model)
answers with a fixed phone number, e-mail address and secret, in English and in Chinese;
copies of it carry different policies.

Shown: redaction and stop, unary equal to streaming, no streamed prefix that holds a match,
token ids of filtered text dropped, a per-adapter policy only for its adapter in a mixed
batch, a hot-swapped policy for new requests only, a malformed policy refused with file,
line and reason while the old one stays, SIGHUP reloading the global file, the metrics."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import grpc
import pytest
from support import REPO, ServerProcess, metric, wait_for

from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc
from textguard import parse_policy
from textguard.detectors import Blocklist, find_pii

PAIRS = {  # prompt -> what the adapter answers
    "en": ("Contact?", "Call 13812345678 or mail abc@x.com, the password is swordfish."),
    "zh": ("联系方式？", "请拨打138-1234-5678或发邮件至abc@x.com谢谢，密码是芝麻开门。"),
}
SECRETS = ["password", "swordfish", "密码", "芝麻开门"]
REDACT = f"""\
rules:
  - name: pii
    pii: all
  - name: secrets
    terms: {json.dumps(SECRETS, ensure_ascii=False)}
    tag: "[SECRET]"
"""
STOP = """\
rules:
  - name: pii
    pii: [phone, email]
  - name: no-magic-words
    terms: [swordfish, 芝麻开门]
    action: stop
"""
REDACTED = {
    "en": "Call [PHONE] or mail [EMAIL], the [SECRET] is [SECRET].",
    "zh": "请拨打[PHONE]或发邮件至[EMAIL]谢谢，[SECRET]是[SECRET]。",
}
STOPPED = {"en": "Call [PHONE] or mail [EMAIL], the password is ",
           "zh": "请拨打[PHONE]或发邮件至[EMAIL]谢谢，密码是"}
GLOBAL = "rules:\n  - name: never\n    terms: [kaboom]\n    action: stop\n"


def train_emitting_lora(model_dir: Path, out: Path, max_steps: int = 400) -> Path:
    """A LoRA trained until greedy decoding answers each PAIRS prompt with its answer, with
    a margin of at least 1 logit at every answer token (so that the server's kernels
    cannot flip an argmax)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]))
    rows = [(tok.encode(p), tok.encode(a)) for p, a in PAIRS.values()]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, a) in enumerate(rows):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        mask[i, :len(p) + len(a)] = 1
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(max_steps):
        logits = model(input_ids=ids, attention_mask=mask).logits
        # a hinge on the margin of each answer token over the best other token
        losses, margins = [], []
        for i, (p, a) in enumerate(rows):
            lg = logits[i, len(p) - 1:len(p) + len(a) - 1]
            target = torch.tensor(a)
            right = lg.gather(1, target[:, None])[:, 0]
            other = lg.scatter(1, target[:, None], float("-inf")).max(1).values
            margins.append((right - other).min().item())
            losses.append(torch.relu(3.0 - (right - other)).mean())
        if min(margins) >= 1.0:
            break
        opt.zero_grad()
        sum(losses).backward()
        opt.step()
    assert min(margins) >= 1.0, f"the emitting LoRA did not converge (margin {margins})"
    model.save_pretrained(out)
    return out


def emitting_adapters(model_dir: Path) -> Path:
    """`plain` (the trained LoRA) and `guarded-onnx` (it with the REDACT policy and a fp32
    ONNX export), made once per model content and training recipe and kept in the cache
    (~1-2 minutes on 2 busy cores; later runs copy them)."""
    import hashlib

    import torch

    h = hashlib.sha256(json.dumps([PAIRS, REDACT, torch.__version__, "recipe-1"]).encode())
    for f in ("config.json", "model.safetensors"):
        h.update((model_dir / f).read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "switchboard" / \
        "test-adapters" / f"emitting-{h.hexdigest()[:16]}"
    if (cache / "done").is_file():
        return cache
    from trainer.onnx_export import export_onnx

    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".emitting-", dir=cache.parent))
    train_emitting_lora(model_dir, tmp / "plain")
    shutil.copytree(tmp / "plain", tmp / "guarded-onnx")
    (tmp / "guarded-onnx" / "output_policy.yaml").write_text(REDACT)
    export_onnx(tmp / "guarded-onnx", quantize="none")
    (tmp / "done").write_text("")
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)
    return cache


@pytest.fixture(scope="module")
def adapter_root(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("policy-adapters")
    made = emitting_adapters(tiny_model)
    lora = shutil.copytree(made / "plain", root / "plain")
    shutil.copytree(made / "guarded-onnx", root / "guarded-onnx")
    for name, policy in (("guarded", REDACT), ("stopper", STOP), ("swap", None),
                         ("swap-v2", REDACT), ("guarded-bad", "rules:\n  - name: x\n"
                                               "    terms: [a]\n    action: block\n")):
        shutil.copytree(lora, root / name)
        if policy is not None:
            (root / name / "output_policy.yaml").write_text(policy)
    return root


@pytest.fixture(scope="module")
def server(tiny_model, adapter_root, tmp_path_factory):
    global_file = tmp_path_factory.mktemp("global") / "policy.yaml"
    global_file.write_text(GLOBAL)
    s = ServerProcess(["--base-model", tiny_model, "--adapter-dir", adapter_root,
                       "--preload", "plain,guarded,stopper,swap",
                       "--max-seq-len", "256", "--kv-cache-memory", "32MiB",
                       "--enable-admin", "--metrics-port", "0", "--threads", "1",
                       "--onnx-adapters", "guarded-onnx", "--onnx-threads", "1",
                       "--output-policy", global_file])
    s.global_file = global_file
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stubs(server):
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.TextGenerationStub(channel), pb_grpc.AdapterAdminStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _request(lang: str, adapter: str, tokenizer) -> pb.GenerateRequest:
    prompt, answer = PAIRS[lang]
    return pb.GenerateRequest(
        prompt=prompt, adapter_id=adapter,
        stopping=pb.StoppingCriteria(max_new_tokens=len(tokenizer.encode(answer))),
        response=pb.ResponseOptions(token_ids=True, logprobs=True))


def _leaks(text: str) -> list[str]:
    """What of the known strings a text still holds (PII hits and secrets)."""
    return [text[h.start:h.end] for h in find_pii(text)] + \
        [text[s:e] for s, e in Blocklist(SECRETS).matcher.finditer(text)]


def _stream(stub, msg):
    chunks = list(stub.GenerateStream(msg, timeout=60))
    return chunks, "".join(c.text for c in chunks)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_plain_adapter_emits_the_known_strings(stubs, tokenizer, lang):
    r = stubs[0].Generate(_request(lang, "plain", tokenizer), timeout=60)
    assert r.text == PAIRS[lang][1]
    assert not r.filtered and list(r.filter_rules) == []
    assert len(_leaks(r.text)) == 4  # phone, e-mail, two secrets: what the policies meet


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_redaction_unary_equals_stream_and_nothing_leaks(stubs, tokenizer, lang):
    stub = stubs[0]
    msg = _request(lang, "guarded", tokenizer)
    r = stub.Generate(msg, timeout=60)
    assert r.text == REDACTED[lang]
    assert r.filtered and list(r.filter_rules) == ["pii", "secrets"]
    assert r.finish_reason == pb.FINISH_REASON_LENGTH
    chunks, streamed = _stream(stub, msg)
    assert streamed == r.text
    assert chunks[-1].filtered and list(chunks[-1].filter_rules) == ["pii", "secrets"]
    seen = ""
    for c in chunks:  # no chunk, and no prefix of the stream, ever held a match
        seen += c.text
        assert _leaks(seen) == [], seen
    # token ids (and logprobs) of filtered text were dropped with it; the rest arrived
    ids = [t for c in chunks for t in c.token_ids]
    assert ids == list(r.token_ids) and len(r.logprobs) == len(ids)
    assert 0 < len(ids) < r.completion_tokens
    assert _leaks(tokenizer.decode(ids)) == []


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_onnx_path_applies_the_adapter_policy(stubs, tokenizer, lang):
    stub = stubs[0]
    msg = _request(lang, "guarded-onnx", tokenizer)
    r = stub.Generate(msg, timeout=60)
    assert r.engine_path == pb.ENGINE_PATH_ONNX
    assert r.text == REDACTED[lang] and list(r.filter_rules) == ["pii", "secrets"]
    chunks, streamed = _stream(stub, msg)
    assert streamed == r.text and chunks[-1].engine_path == pb.ENGINE_PATH_ONNX
    assert [t for c in chunks for t in c.token_ids] == list(r.token_ids)
    assert _leaks(tokenizer.decode(r.token_ids)) == []


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_stop_ends_the_response_filtered(stubs, tokenizer, lang):
    stub = stubs[0]
    msg = _request(lang, "stopper", tokenizer)
    msg.stopping.max_new_tokens += 8  # room after the answer: generation must stop early
    r = stub.Generate(msg, timeout=60)
    assert r.text == STOPPED[lang]
    assert r.finish_reason == pb.FINISH_REASON_FILTERED
    assert r.filtered and list(r.filter_rules) == ["pii", "no-magic-words"]
    # generation stopped once the match was certain: at the answer's last token at most
    assert r.completion_tokens <= msg.stopping.max_new_tokens - 8
    chunks, streamed = _stream(stub, msg)
    assert streamed == r.text and chunks[-1].finish_reason == pb.FINISH_REASON_FILTERED
    assert "swordfish" not in tokenizer.decode(r.token_ids)
    assert "芝麻" not in tokenizer.decode(r.token_ids)


def test_per_adapter_policy_only_for_its_adapter_in_a_mixed_batch(server, stubs, tokenizer):
    stub = stubs[0]
    before = metric(server.metrics_port, "switchboard_batch_size_count") - \
        metric(server.metrics_port, "switchboard_batch_size_bucket", le="1.0")
    jobs = [(lang, adapter) for _ in range(2) for lang in PAIRS
            for adapter in ("plain", "guarded", "stopper")]
    results: dict[int, pb.GenerateResponse] = {}
    start = threading.Barrier(len(jobs))

    def call(i: int, lang: str, adapter: str) -> None:
        start.wait()
        results[i] = stub.Generate(_request(lang, adapter, tokenizer), timeout=120)

    threads = [threading.Thread(target=call, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = {"plain": PAIRS, "guarded": REDACTED, "stopper": STOPPED}
    for i, (lang, adapter) in enumerate(jobs):
        want = expected[adapter][lang]
        assert results[i].text == (want[1] if adapter == "plain" else want), (adapter, lang)
    after = metric(server.metrics_port, "switchboard_batch_size_count") - \
        metric(server.metrics_port, "switchboard_batch_size_bucket", le="1.0")
    assert after > before  # steps with more than one row ran: the adapters shared batches


def test_metrics_count_filtered_responses_by_adapter_and_rule(server, stubs, tokenizer):
    port = server.metrics_port
    by_rule = lambda rule: metric(port, "switchboard_filtered_responses_by_rule_total",  # noqa: E731
                                  adapter="guarded", rule=rule)
    responses = lambda action: metric(port, "switchboard_filtered_responses_total",  # noqa: E731
                                      adapter="stopper", action=action)
    pii, stops = by_rule("pii"), responses("stop")
    stubs[0].Generate(_request("en", "guarded", tokenizer), timeout=60)
    stubs[0].Generate(_request("zh", "stopper", tokenizer), timeout=60)
    assert by_rule("pii") == pii + 1 and responses("stop") == stops + 1
    assert metric(port, "switchboard_filtered_responses_total", adapter="plain") == 0
    log = "".join(server.lines)
    assert "redacted by rule pii, secrets" in log and "stopped by rule no-magic-words" in log
    for leaked in ("13812345678", "abc@x.com", "swordfish", "芝麻开门"):
        assert leaked not in log  # the log names rules, never the matched text


def test_hot_swapped_policy_applies_to_new_requests_only(stubs, tokenizer):
    stub, admin = stubs
    running = stub.GenerateStream(_request("en", "swap", tokenizer), timeout=60)
    first = next(running)  # the request runs: it holds the policy it started with (none)
    loaded = admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="swap", path="swap-v2"))
    assert loaded.replaced
    old = first.text + "".join(c.text for c in running)
    assert old == PAIRS["en"][1]
    new = stub.Generate(_request("en", "swap", tokenizer), timeout=60)
    assert new.text == REDACTED["en"] and new.adapter_version == loaded.adapter.version


def test_malformed_adapter_policy_is_refused_and_the_old_one_stays(stubs, tokenizer):
    stub, admin = stubs
    before = stub.Generate(_request("zh", "guarded", tokenizer), timeout=60)
    with pytest.raises(grpc.RpcError) as e:
        admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="guarded", path="guarded-bad"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "guarded-bad/output_policy.yaml:4: rules[0] (x): action 'block' is not one of " \
        "redact, stop" in e.value.details()
    after = stub.Generate(_request("zh", "guarded", tokenizer), timeout=60)
    assert after.text == REDACTED["zh"] and after.adapter_version == before.adapter_version


def test_sighup_reloads_the_global_policy(server, stubs, tokenizer):
    stub = stubs[0]
    path: Path = server.global_file

    def reload() -> str:
        """SIGHUP; -> the server's line saying what came of it."""
        n = len(server.lines)
        os.kill(server.proc.pid, signal.SIGHUP)
        return wait_for(lambda: next((ln for ln in server.lines[n:]
                                      if ln.startswith("switchboard: output policy")), None))

    assert stub.Generate(_request("en", "plain", tokenizer), timeout=60).text == PAIRS["en"][1]
    path.write_text("rules:\n  - name: fish\n    terms: [swordfish]\n    tag: '[FISH]'\n")
    assert "reloaded" in reload()
    r = stub.Generate(_request("en", "plain", tokenizer), timeout=60)
    assert r.text == "Call 13812345678 or mail abc@x.com, the password is [FISH]."
    assert list(r.filter_rules) == ["fish"]
    # global and adapter rules add up; at the same place the global rule (first) wins
    g = stub.Generate(_request("en", "guarded", tokenizer), timeout=60)
    assert g.text == "Call [PHONE] or mail [EMAIL], the [SECRET] is [FISH]."
    assert list(g.filter_rules) == ["pii", "secrets", "fish"]
    path.write_text("rules:\n  - name: fish\n    terms: [swordfish]\n    action: sink\n")
    line = reload()
    assert f"refused: {path}:4: rules[0] (fish): action 'sink' is not one of" in line
    r = stub.Generate(_request("en", "plain", tokenizer), timeout=60)
    assert r.text.endswith("is [FISH].")  # the previous policy stays
    path.write_text(GLOBAL)
    assert "reloaded" in reload()
    assert stub.Generate(_request("en", "plain", tokenizer), timeout=60).text == PAIRS["en"][1]


def test_malformed_global_policy_stops_the_start(tmp_path):
    bad = tmp_path / "policy.yaml"
    bad.write_text("rules:\n  - name: ok\n    pii: all\n  - name: re\n    pattern: 'a(b'\n")
    p = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--port", "0",
                        "--output-policy", str(bad)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2
    assert f"{bad}:5: rules[1] (re): pattern 'a(b' is not a valid regular expression" \
        in p.stderr


def test_policies_in_docs_parse():
    """The examples in docs/security.md are valid policies."""
    text = (REPO / "docs" / "security.md").read_text()
    section = text[text.index("## Output policies"):text.index("## Deadlines")]
    blocks = [b.split("```", 1)[0] for b in section.split("```yaml\n")[1:]]
    assert len(blocks) == 2
    for block in blocks:
        assert parse_policy(block, "docs/security.md").rules


def test_rule_labels_are_bounded():
    from server.metrics import MAX_RULE_LABELS, OTHER_LABEL, ServerMetrics

    m = ServerMetrics()
    for i in range(MAX_RULE_LABELS + 10):
        m.response_filtered("", [f"rule-{i}", f"rule-{i}"], stopped=i % 2 == 0)
    rules = {s.labels["rule"]: s.value for f in m.registry.collect()
             if f.name == "switchboard_filtered_responses_by_rule" for s in f.samples
             if s.name.endswith("_total")}
    assert len(rules) == MAX_RULE_LABELS + 1 and rules[OTHER_LABEL] == 10
    assert rules["rule-0"] == 1  # a response counts once per rule
    actions = {s.labels["action"]: s.value for f in m.registry.collect()
               if f.name == "switchboard_filtered_responses" for s in f.samples
               if s.name.endswith("_total")}
    assert actions == {"stop": (MAX_RULE_LABELS + 10) / 2, "redact": (MAX_RULE_LABELS + 10) / 2}
