"""CLI argument parsing and request building (no server needed)."""

from __future__ import annotations

import pytest

from clients import cli, convert
from clients.channel import call_metadata
from switchboard.v1 import switchboard_pb2 as pb


def parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


def test_global_options_before_or_after_the_command():
    a = parse("--target", "h:1", "--json", "generate", "hi")
    b = parse("generate", "hi", "--target", "h:1", "--json")
    for args in (a, b):
        assert args.target == "h:1" and args.json is True and args.prompt == "hi"
    assert parse("generate", "hi").target == "127.0.0.1:50051"


def test_generation_options():
    args = parse("chat", "hi", "-a", "lora-1", "-n", "16", "-t", "0.7", "--top-p", "0.9",
                 "--seed", "3", "--stop", "\n", "--stop", "END", "--stream", "--system", "s")
    p = cli.generation_params(args)
    assert p["adapter_id"] == "lora-1" and p["max_new_tokens"] == 16 and p["seed"] == 3
    assert p["stop"] == ["\n", "END"] and args.stream
    assert cli.chat_messages(args) == [{"role": "system", "content": "s"},
                                       {"role": "user", "content": "hi"}]


def test_adapters_subcommands():
    assert parse("adapters", "list").adapters_command == "list"
    args = parse("adapters", "load", "x", "--path", "sub/x", "--target", "h:2")
    assert (args.adapter_id, args.path, args.target) == ("x", "sub/x", "h:2")
    with pytest.raises(SystemExit):
        parse("adapters")


def test_loadtest_config_from_args(tmp_path):
    cfg = cli.loadtest_config(parse("loadtest", "-r", "5", "--requests", "50",
                                    "--num-adapters", "4", "--mix", "zipf",
                                    "--zipf-exponent", "1.5", "--target", "a:1,b:2"))
    assert cfg.rate == 5 and cfg.mode == "open" and cfg.num_requests == 50
    assert cfg.duration_s is None and cfg.adapters == tuple(f"adapter-{i}" for i in range(4))
    assert cfg.adapter_mix().probabilities[0] > cfg.adapter_mix().probabilities[1]
    cfg = cli.loadtest_config(parse("loadtest", "--adapters", "base,a"))
    assert cfg.adapters == ("", "a") and cfg.duration_s == 30 and cfg.mode == "closed"
    w = tmp_path / "w.json"
    w.write_text('{"a": 1, "b": 3}')
    cfg = cli.loadtest_config(parse("loadtest", "--weights-file", str(w), "--no-stream"))
    assert cfg.distribution == "weights" and not cfg.stream
    assert cfg.adapter_mix().probability("b") == 0.75
    with pytest.raises(SystemExit):
        parse("loadtest", "-c", "2", "-r", "3")


def test_client_side_errors_are_one_line(capsys):
    assert cli.main(["chat", "--target", "127.0.0.1:1"]) == 1
    assert capsys.readouterr().err == "error: chat needs a message or --messages-file\n"
    assert cli.main(["--target", "127.0.0.1:1", "--timeout", "5", "info"]) == 1
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")


def test_generate_request_fields():
    req = convert.generate_request(
        messages=[{"role": "user", "content": "hi"}, ("assistant", "yo")], adapter_id="a",
        temperature=0.5, top_k=5, seed=0, max_new_tokens=9, stop="X", ignore_eos=True,
        token_ids_out=True, logprobs=True, request_id="r1",
    )
    assert req.WhichOneof("input") == "messages" and len(req.messages.messages) == 2
    assert req.sampling.HasField("seed") and req.sampling.seed == 0
    assert req.sampling.top_p == 0.0  # unset = server default
    assert list(req.stopping.stop_sequences) == ["X"] and req.stopping.max_new_tokens == 9
    assert req.response.token_ids and req.response.logprobs and req.request_id == "r1"
    assert not convert.generate_request("p").sampling.HasField("seed")
    assert convert.generate_request(token_ids=[1, 2]).token_ids.ids == [1, 2]
    with pytest.raises(ValueError, match="exactly one"):
        convert.generate_request("p", token_ids=[1])
    with pytest.raises(ValueError, match="exactly one"):
        convert.generate_request()
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        convert.generate_request(messages=[{"text": "x"}])


def test_stream_chunks_fold_into_the_unary_result():
    msgs = [pb.GenerateStreamResponse(text="你", token_ids=[1]),
            pb.GenerateStreamResponse(text="好🙂", token_ids=[2, 3]),
            pb.GenerateStreamResponse(finish_reason=pb.FINISH_REASON_STOP_SEQUENCE,
                                      prompt_tokens=4, completion_tokens=3,
                                      timings=pb.Timings(total_seconds=1.0))]
    chunks = [convert.stream_chunk(m, "h:1") for m in msgs]
    assert [c.finish_reason for c in chunks] == [None, None, "stop_sequence"]
    result = convert.result_from_chunks(chunks)
    assert result.text == "你好🙂" and result.token_ids == [1, 2, 3]
    assert result.finish_reason == "stop_sequence" and result.timings.total_seconds == 1.0


def test_call_metadata():
    assert call_metadata("a", None) == (("x-adapter-id", "a"),)
    assert call_metadata("", "k", "r") == (  # base model: no x-adapter-id to hash on
        ("authorization", "Bearer k"), ("x-request-id", "r"))


def test_structured_output_options(tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object"}')
    req = convert.generate_request("hi", **cli.generation_params(
        parse("generate", "hi", "--json-schema", f"@{schema}")))
    assert req.response_format.json_schema == '{"type": "object"}'
    req = convert.generate_request("hi", **cli.generation_params(
        parse("generate", "hi", "--regex", "[0-9]+")))
    assert req.response_format.WhichOneof("format") == "regex"
    req = convert.generate_request("hi", **cli.generation_params(parse("chat", "hi",
                                                                       "--json-object")))
    assert req.response_format.json_object
    assert not convert.generate_request("hi").HasField("response_format")
    assert convert.generate_request("hi", json_schema={"type": "string"}).response_format \
        .json_schema == '{"type": "string"}'
    with pytest.raises(SystemExit):  # one format at most
        parse("generate", "hi", "--json-object", "--regex", "a")
    with pytest.raises(ValueError, match="at most one of json_schema, json_object, regex"):
        convert.generate_request("hi", json_object=True, regex="a")
