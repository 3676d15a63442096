"""A bundled real model through the server against transformers' generate, greedy, fp32:
`python -m benchmarks.bundled_parity [gemma-3-270m]` (provisions the model if needed).
Exit 0 when every prompt's 32 tokens are identical."""

from __future__ import annotations

import re
import subprocess
import sys

import grpc
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.model_store import bundled_model, provision_model
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a small village,"]
NEW_TOKENS = 32


def reference(model_dir) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        out.append(gen[0, ids["input_ids"].shape[1]:].tolist())
    return out


def main() -> int:
    name = sys.argv[1] if len(sys.argv) > 1 else "gemma-3-270m"
    ref = reference(provision_model(bundled_model(name)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--base-model", name, "--port", "0",
         "--metrics-port", "-1", "--adapter-dir", "/tmp"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port = None
    try:
        for line in proc.stdout:
            found = re.search(r"listening on [^:]+:(\d+)", line)
            port = int(found.group(1)) if found else port
            if "ready" in line:
                break
        stub = pb_grpc.TextGenerationStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        same = 0
        for prompt, want in zip(PROMPTS, ref, strict=True):
            resp = stub.Generate(pb.GenerateRequest(
                prompt=prompt, response=pb.ResponseOptions(token_ids=True),
                stopping=pb.StoppingCriteria(max_new_tokens=NEW_TOKENS, ignore_eos=True)))
            equal = list(resp.token_ids)[: len(want)] == want
            same += equal
            print(f"{'same' if equal else 'DIFFERENT'}: {prompt!r} -> {resp.text[:60]!r}")
    finally:
        proc.terminate()
    print(f"{name}: {same} of {len(PROMPTS)} prompts token-identical to transformers "
          f"({NEW_TOKENS} greedy tokens, fp32)")
    return 0 if same == len(PROMPTS) else 1


if __name__ == "__main__":
    sys.exit(main())
