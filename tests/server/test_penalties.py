"""presence_penalty and frequency_penalty as OpenAI defines them, on gRPC and on HTTP:
at every generated position the server's logprobs (top 20 and the chosen token's) equal
log_softmax((logits - frequency * count - presence * (count > 0)) / T) computed here from
transformers' logits, with count(t) the occurrences of t among the tokens generated so
far (not the prompt)."""

from __future__ import annotations

import grpc
import openai
import pytest
import torch
from support import ServerProcess

from server.engine.sampling import apply_presence_frequency
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

PROMPT_IDS = [1, 504, 3777, 2112, 314, 260, 1345, 28]
NEW = 16
SETTINGS = [(1.5, 0.0), (0.0, 1.0), (0.8, -0.6), (-1.0, 0.5)]  # (presence, frequency)


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    s = ServerProcess(["--base-model", tiny_model, "--adapter-dir",
                       tmp_path_factory.mktemp("adapters"), "--max-seq-len", "128",
                       "--kv-cache-memory", "16MiB", "--http-port", "0"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.TextGenerationStub(channel)


@pytest.fixture(scope="module")
def hf_logits(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()

    def logits(output: list[int]) -> torch.Tensor:
        """[len(output), V]: the logits that chose each generated token."""
        ids = torch.tensor([PROMPT_IDS + output[:-1]])
        with torch.no_grad():
            return model(ids).logits[0, len(PROMPT_IDS) - 1:].float()

    return logits


def reference(logits: torch.Tensor, output: list[int], presence: float, frequency: float,
              temperature: float) -> torch.Tensor:
    """[len(output), V] logprobs by the formula, written out with a count vector."""
    rows = []
    for k in range(len(output)):
        count = torch.bincount(torch.tensor(output[:k], dtype=torch.long),
                               minlength=logits.shape[-1]).float()
        row = logits[k] - frequency * count - presence * (count > 0).float()
        rows.append((row / (temperature or 1.0)).log_softmax(-1))
    return torch.stack(rows)


def test_apply_presence_frequency_matches_the_formula():
    torch.manual_seed(0)
    logits = torch.randn(50)
    output = [3, 7, 3, 3, 9, 7]
    got = logits.clone()
    apply_presence_frequency(got, output, 0.5, 0.25)
    want = logits.clone()
    for t in set(output):
        want[t] -= 0.25 * output.count(t) + 0.5
    assert torch.equal(got, want)


def _grpc(stub, presence: float, frequency: float, temperature: float = 0.0,
          seed: int | None = None) -> pb.GenerateResponse:
    sampling = pb.SamplingParameters(temperature=temperature, presence_penalty=presence,
                                     frequency_penalty=frequency)
    if seed is not None:
        sampling.seed = seed
    return stub.Generate(pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=PROMPT_IDS), sampling=sampling,
        stopping=pb.StoppingCriteria(max_new_tokens=NEW, ignore_eos=True),
        response=pb.ResponseOptions(token_ids=True, logprobs=True, top_logprobs=20)),
        timeout=60)


@pytest.mark.parametrize("presence,frequency", SETTINGS)
def test_grpc_logprobs_equal_the_reference(stub, hf_logits, presence, frequency):
    r = _grpc(stub, presence, frequency)
    out = list(r.token_ids)
    ref = reference(hf_logits(out), out, presence, frequency, 0.0)
    assert len(r.top_logprobs) == NEW
    for k, tok in enumerate(out):
        top = r.top_logprobs[k]
        want = ref[k].topk(20)
        assert list(top.logprobs) == pytest.approx(want.values.tolist(), abs=2e-4)
        assert r.logprobs[k] == pytest.approx(float(ref[k, tok]), abs=2e-4)
        assert float(ref[k, tok]) == pytest.approx(float(want.values[0]), abs=2e-4)  # greedy
    streamed = list(stub.GenerateStream(pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=PROMPT_IDS),
        sampling=pb.SamplingParameters(presence_penalty=presence, frequency_penalty=frequency),
        stopping=pb.StoppingCriteria(max_new_tokens=NEW, ignore_eos=True),
        response=pb.ResponseOptions(top_logprobs=3)), timeout=60))
    tops = [t for m in streamed for t in m.top_logprobs]
    assert [list(t.token_ids) for t in tops] == [list(t.token_ids)[:3] for t in r.top_logprobs]


def test_penalties_change_the_greedy_answer(stub):
    plain = list(_grpc(stub, 0.0, 0.0).token_ids)
    assert len(set(plain)) < len(plain)  # the tiny model repeats itself without penalties
    changed = [list(_grpc(stub, p, f).token_ids) != plain for p, f in SETTINGS]
    assert changed[0] and changed[1]


def test_sampled_rows_apply_penalties_before_temperature(stub, hf_logits):
    r = _grpc(stub, 0.7, 0.4, temperature=0.8, seed=11)
    out = list(r.token_ids)
    ref = reference(hf_logits(out), out, 0.7, 0.4, 0.8)
    assert list(r.logprobs) == pytest.approx([float(ref[k, t]) for k, t in enumerate(out)],
                                             abs=2e-4)


@pytest.mark.parametrize("presence,frequency", SETTINGS[:3])
def test_http_applies_the_same_penalties(server, stub, hf_logits, presence, frequency):
    want = _grpc(stub, presence, frequency)
    client = openai.OpenAI(base_url=server.http_url, api_key="unused", max_retries=0)
    r = client.completions.create(
        model=client.models.list().data[0].id, prompt=PROMPT_IDS, max_tokens=NEW,
        temperature=0, presence_penalty=presence, frequency_penalty=frequency, logprobs=5,
        extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert choice.text == want.text
    out = list(want.token_ids)
    ref = reference(hf_logits(out), out, presence, frequency, 0.0)
    assert choice.logprobs.token_logprobs == pytest.approx(
        [float(ref[k, t]) for k, t in enumerate(out)], abs=2e-4)
    for k, top in enumerate(choice.logprobs.top_logprobs):
        best = ref[k].topk(5).values  # (two ids may decode to one string: a dict key)
        assert max(top.values()) == pytest.approx(float(best[0]), abs=2e-4)
        assert all(float((best - v).abs().min()) < 2e-4 for v in top.values())
