"""What an output policy costs: throughput and inter-token p99 with a global policy of 100
blocked terms (50 English, 50 Chinese), 10 patterns and every PII detector, against no
policy, on one server in one run.

Default model, base model only, streaming clients through gRPC (the project's load
generator), EOS ignored so both sides generate the same number of tokens. The policy is
switched by rewriting the `--output-policy` file and sending SIGHUP, so both sides run in
the same process; each round measures both, in alternating order (this VM's speed drifts),
and the medians of the per-round ratios are reported. Inter-token latency is what the
client sees: token ids arrive with their text, so the policy's hold-back is in it. Also
reported: the matcher's own cost per token, measured in this process on the same policy
over text of the same kind.

    python -m benchmarks.safety [--rounds 3] [--clients 16] [--requests 32]
                                [--new-tokens 128] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from pathlib import Path

from benchmarks.common import Server, median, print_table, write_results
from clients.loadtest import LoadTestConfig, run_loadtest
from textguard import parse_policy

EN_TERMS = """
confidential classified proprietary password passphrase credential secretkey privatekey
apitoken accesstoken bearer session-cookie ssn passport driverlicense taxid routing
swift iban pin-code cvv cvc securitycode mothersmaiden blueprint roadmap-internal
layoff merger acquisition earnings-preview insider embargoed prerelease kaboom detonate
explosive firearm ammunition narcotics cocaine heroin meth counterfeit launder bribe
extort ransomware malware exploit zeroday
""".split()
ZH_TERMS = """
机密 绝密 内部资料 密码 口令 密钥 私钥 令牌 身份证号 护照号 银行卡号 信用卡号 验证码
安全码 开户行 工资单 裁员 并购 收购 财报 内幕 禁售 未公开 爆炸 炸药 枪支 弹药 毒品
可卡因 海洛因 冰毒 假币 洗钱 行贿 受贿 勒索 恶意软件 漏洞利用 零日 木马 病毒 钓鱼
诈骗 传销 赌博 色情 暴力 恐怖 走私 偷渡
""".split()
PATTERNS = [
    ("order-id", r"ORD-\d{6,10}"),
    ("ticket", r"TICKET-[A-Z]{2}\d{4,8}"),
    ("ipv4", r"(?<!\d)(?:\d{1,3}\.){3}\d{1,3}(?!\d)"),
    ("uuid", r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"),
    ("openai-key", r"sk-[A-Za-z0-9]{20,64}"),
    ("aws-key", r"AKIA[0-9A-Z]{16}"),
    ("github-token", r"gh[pousr]_[A-Za-z0-9]{36}"),
    ("jwt", r"eyJ[A-Za-z0-9_-]{8,200}\.[A-Za-z0-9_-]{8,200}\.[A-Za-z0-9_-]{8,200}"),
    ("iban", r"[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){3,7}"),
    ("internal-url", r"https?://[a-z0-9.-]+\.internal(?:/\S*)?"),  # unbounded: capped
]


def policy_text() -> str:
    assert len(EN_TERMS) == 50 and len(ZH_TERMS) == 50, (len(EN_TERMS), len(ZH_TERMS))
    rules = [{"name": "terms-en", "terms": EN_TERMS},
             {"name": "terms-zh", "terms": ZH_TERMS, "action": "stop"},
             {"name": "pii", "pii": "all"}]
    rules += [{"name": name, "pattern": pattern, "tag": f"[SECRET-{i}]"}
              for i, (name, pattern) in enumerate(PATTERNS)]
    rules[-1]["max_chars"] = 128  # internal-url has no bound
    return json.dumps({"rules": rules}, ensure_ascii=False, indent=1)


def matcher_cost(policy_json: str, texts: list[str], tokenizer) -> float:
    """Microseconds per token of the policy's streaming matcher, token by token."""
    policy = parse_policy(policy_json, "bench")
    pieces = [[tokenizer.decode([t]) for t in tokenizer.encode(text)] for text in texts]
    n = sum(len(p) for p in pieces)
    t0 = time.perf_counter()
    for p in pieces:
        s = policy.stream()
        for i, piece in enumerate(p):
            s.push(piece, i)
        s.finish()
    return (time.perf_counter() - t0) / n * 1e6


def load(target: str, clients: int, requests: int, new_tokens: int):
    cfg = LoadTestConfig(target=target, concurrency=clients, duration_s=None,
                         num_requests=requests, adapters=("",), distribution="round_robin",
                         max_new_tokens=new_tokens, ignore_eos=True, progress=False)
    result = run_loadtest(cfg)
    if result.requests_failed:
        raise RuntimeError(f"{result.requests_failed} requests failed: {result.errors_by_code}")
    return result


def switch(server: Server, path: Path, text: str) -> None:
    """Write the global policy file and have the server reload it (SIGHUP)."""
    path.write_text(text)
    n = len(server.lines)
    os.kill(server.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = next((ln for ln in server.lines[n:]
                     if ln.startswith("switchboard: output policy")), None)
        if line is not None:
            if "reloaded" not in line:
                raise RuntimeError(f"policy reload failed: {line}")
            return
        time.sleep(0.02)
    raise RuntimeError("the server did not report the policy reload")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=32, help="requests per measurement")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="one round, fewer requests")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--server-arg", action="append", default=[])
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.requests, a.new_tokens = 1, a.clients, 32
    full = policy_text()
    empty = "rules: []\n"
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-safety-") as tmp:
        path = Path(tmp) / "policy.yaml"
        path.write_text(empty)
        args = ["--output-policy", path, "--max-batch-size", a.clients,
                "--max-seq-len", 1024, "--kv-cache-memory", "1GiB", *a.server_arg]
        with Server(args) as server:
            load(server.target, a.clients, a.clients, 8)  # warm-up
            for r in range(a.rounds):
                sides = {}
                for side in (("off", "on") if r % 2 == 0 else ("on", "off")):
                    switch(server, path, full if side == "on" else empty)
                    sides[side] = load(server.target, a.clients, a.requests, a.new_tokens)
                off, on = sides["off"], sides["on"]
                rounds.append({
                    "tokens_per_s_off": off.output_tokens_per_s,
                    "tokens_per_s_on": on.output_tokens_per_s,
                    "throughput_ratio": on.output_tokens_per_s / off.output_tokens_per_s,
                    "itl_p99_s_off": off.itl.p99, "itl_p99_s_on": on.itl.p99,
                    "itl_p99_ratio": on.itl.p99 / off.itl.p99,
                    "itl_p50_s_off": off.itl.p50, "itl_p50_s_on": on.itl.p50,
                })
                print(f"round {r + 1}: {off.output_tokens_per_s:.1f} tok/s without policy, "
                      f"{on.output_tokens_per_s:.1f} with; inter-token p99 "
                      f"{off.itl.p99 * 1e3:.1f} ms vs {on.itl.p99 * 1e3:.1f} ms", flush=True)
    from transformers import AutoTokenizer

    from clients.workload import builtin_prompts
    from server.model_store import provision_default_model

    tok = AutoTokenizer.from_pretrained(provision_default_model())
    sample = [m for prompt in builtin_prompts() for _, m in prompt.messages] * 4
    sample += ["请拨打13812345678或发邮件至abc@x.com谢谢，身份证11010519491231002X。" * 4]
    us_per_token = matcher_cost(full, sample, tok)
    summary = {key: median([r[key] for r in rounds]) for key in rounds[0]}
    summary["throughput_cost"] = 1 - summary["throughput_ratio"]
    summary["within_5_percent"] = summary["throughput_cost"] < 0.05
    summary["matcher_us_per_token"] = us_per_token
    print_table(f"safety (median of {len(rounds)} rounds; 100 terms, {len(PATTERNS)} patterns, "
                f"all PII detectors; {a.clients} clients, {a.new_tokens} new tokens)",
                list(summary.items()))
    result = {**summary, "rounds": rounds,
              "policy": {"terms": len(EN_TERMS) + len(ZH_TERMS), "patterns": len(PATTERNS),
                         "pii": "all"},
              "settings": vars(a) | {"out": a.out and str(a.out),
                                     "model": "smollm2-135m-instruct"}}
    out = write_results("safety", result, a.out)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
