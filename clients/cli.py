"""`switchboard-client`: call a Switchboard server from the shell.

    switchboard-client generate "Once upon a time" --max-new-tokens 32 --stream
    switchboard-client chat "What is the capital of France?" --adapter my-lora
    switchboard-client adapters list | load ID [--path P] | unload ID
    switchboard-client health | info
    switchboard-client loadtest --concurrency 8 --duration 30 --adapters a,b,c --plot lt.png

Global options (--target, --api-key, --tls..., --timeout, --json) go before or after the
command. Errors print one line `error: CODE: message` and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import convert
from .client import SwitchboardClient
from .errors import SwitchboardError
from .routing import DEFAULT_TARGET

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _add_connection_options(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    # Subcommands repeat the global options with SUPPRESS defaults, so that an option given
    # before the command is not overwritten by the subparser's default.
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    g = p.add_argument_group("connection")
    g.add_argument("--target", default=d(os.environ.get("SWITCHBOARD_TARGET", DEFAULT_TARGET)),
                   help="host:port, or several comma-separated for client-side routing "
                   "(env SWITCHBOARD_TARGET)")
    g.add_argument("--api-key", default=d(os.environ.get("SWITCHBOARD_API_KEY")),
                   help="sent as 'authorization: Bearer KEY' (env SWITCHBOARD_API_KEY)")
    g.add_argument("--tls", action="store_true", default=d(False),
                   help="use TLS (implied by --tls-ca/--tls-cert)")
    g.add_argument("--tls-ca", default=d(None), metavar="PEM", help="root certificate(s)")
    g.add_argument("--tls-cert", default=d(None), metavar="PEM", help="client certificate (mTLS)")
    g.add_argument("--tls-key", default=d(None), metavar="PEM", help="client key (mTLS)")
    g.add_argument("--tls-server-name", default=d(None), metavar="NAME",
                   help="name to verify in the server certificate")
    g.add_argument("--timeout", type=float, default=d(None), metavar="S",
                   help="per-call deadline in seconds")
    g.add_argument("--json", action="store_true", default=d(False),
                   help="machine-readable JSON output")


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-a", "--adapter", default="", help="adapter id (default: base model)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=None)
    p.add_argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop sequence (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--token-ids", action="store_true", help="return the generated token ids")
    p.add_argument("--logprobs", action="store_true", help="return token logprobs")
    p.add_argument("--request-id", default=None)
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json-schema", default=None, metavar="SCHEMA",
                     help="structured output: the answer follows this JSON schema (JSON "
                     "text, or @FILE)")
    fmt.add_argument("--json-object", action="store_true",
                     help="structured output: the answer is a JSON object")
    fmt.add_argument("--regex", default=None, help="structured output: the answer matches "
                     "this regular expression")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchboard-client", description="Switchboard gRPC client",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
    )
    _add_connection_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="complete a raw prompt")
    gen.add_argument("prompt", help="prompt text, or - to read stdin")
    _add_generation_options(gen)

    chat = sub.add_parser("chat", help="chat with the model (chat template applied)")
    chat.add_argument("message", nargs="?", help="user message, or - to read stdin")
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("--messages-file", default=None, metavar="JSON",
                      help='a JSON list of {"role", "content"} messages')
    _add_generation_options(chat)

    tok = sub.add_parser("tokenize", help="show the token ids of a prompt")
    tok.add_argument("prompt", help="prompt text, or - to read stdin")

    adapters = sub.add_parser("adapters", help="list, load or unload adapters")
    asub = adapters.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")
    asub.add_parser("list", help="list adapters")
    load = asub.add_parser("load", help="load or replace an adapter")
    load.add_argument("adapter_id")
    load.add_argument("--path", default="", help="inside the adapter root (default: <root>/ID)")
    unload = asub.add_parser("unload", help="unload an adapter")
    unload.add_argument("adapter_id")

    health = sub.add_parser("health", help="gRPC health status (of every endpoint)")
    health.add_argument("--service", default="", help="service name (default: overall)")

    sub.add_parser("info", help="model and server information")

    lt = sub.add_parser("loadtest", help="generate load and report latency and throughput")
    loop = lt.add_mutually_exclusive_group()
    loop.add_argument("-c", "--concurrency", type=int, default=4,
                      help="closed loop: concurrent requests (default 4)")
    loop.add_argument("-r", "--rate", type=float, default=None,
                      help="open loop: mean requests/s, Poisson arrivals")
    lt.add_argument("-d", "--duration", type=float, default=None,
                    help="seconds (default 30 unless --requests is given)")
    lt.add_argument("--requests", type=int, default=None, help="stop after N requests")
    lt.add_argument("--adapters", default=None,
                    help="comma-separated adapter ids ('' or 'base' = base model)")
    lt.add_argument("--num-adapters", type=int, default=None,
                    help="generate N adapter ids from --adapter-pattern")
    lt.add_argument("--adapter-pattern", default="adapter-{i}", help="default adapter-{i}")
    lt.add_argument("--mix", choices=["uniform", "zipf", "weights", "round_robin"],
                    default="uniform",
                    help="adapter distribution")
    lt.add_argument("--zipf-exponent", type=float, default=1.0)
    lt.add_argument("--weights-file", default=None,
                    help="adapter weights: JSON {id: w} or lines 'id weight' (implies "
                    "--mix weights)")
    lt.add_argument("--prompts", default=None, metavar="JSONL",
                    help='prompt set: lines "text", {"prompt": ...} or {"messages": [...]}')
    lt.add_argument("-n", "--max-new-tokens", type=int, default=64)
    lt.add_argument("--ignore-eos", action="store_true")
    lt.add_argument("-t", "--temperature", type=float, default=0.0)
    lt.add_argument("--no-stream", action="store_true",
                    help="unary calls (no TTFT or inter-token latency)")
    lt.add_argument("--seed", type=int, default=0)
    lt.add_argument("--max-in-flight", type=int, default=1024)
    lt.add_argument("--no-progress", action="store_true", help="no live line on stderr")
    lt.add_argument("--output", "-o", default=None, metavar="JSON", help="write the result")
    lt.add_argument("--records", action="store_true",
                    help="include per-request records in the JSON")
    lt.add_argument("--plot", default=None, metavar="PNG", help="write a latency plot")

    for p in (gen, chat, tok, adapters, health, lt, *asub.choices.values(),
              sub.choices["info"]):
        _add_connection_options(p, suppress=True)
    return parser


def client_from_args(args: argparse.Namespace) -> SwitchboardClient:
    return SwitchboardClient(args.target, **client_options(args))


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        api_key=args.api_key, tls=args.tls, root_cert=args.tls_ca, client_cert=args.tls_cert,
        client_key=args.tls_key, server_name=args.tls_server_name, timeout=args.timeout,
    )


def _read_arg(text: str | None) -> str | None:
    return sys.stdin.read() if text == "-" else text


def generation_params(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        adapter_id=args.adapter, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
        max_new_tokens=args.max_new_tokens, stop=args.stop, ignore_eos=args.ignore_eos,
        token_ids_out=args.token_ids, logprobs=args.logprobs, request_id=args.request_id,
        json_schema=_schema_arg(args.json_schema), json_object=args.json_object,
        regex=args.regex,
    )


def _schema_arg(text: str | None) -> str | None:
    if text is not None and text.startswith("@"):
        return Path(text[1:]).read_text()
    return text


def chat_messages(args: argparse.Namespace) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    if args.messages_file:
        with open(args.messages_file, encoding="utf-8") as f:
            messages = json.load(f)
        if not isinstance(messages, list):
            raise ValueError(f"{args.messages_file}: expected a JSON list of messages")
    if args.system:
        messages.insert(0, {"role": "system", "content": args.system})
    message = _read_arg(args.message)
    if message is not None:
        messages.append({"role": "user", "content": message})
    if not messages:
        raise ValueError("chat needs a message or --messages-file")
    return messages


def _print_json(value: Any) -> None:
    print(json.dumps(convert.to_jsonable(value), indent=2, ensure_ascii=False))


def _generation_footer(result: Any) -> str:
    t = result.timings
    parts = [f"finish={result.finish_reason}", f"prompt_tokens={result.prompt_tokens}",
             f"completion_tokens={result.completion_tokens}"]
    if result.adapter_id:
        parts.append(f"adapter={result.adapter_id}@{result.adapter_version}")
    if t is not None and t.total_seconds:
        parts.append(f"ttft={t.time_to_first_token_seconds * 1000:.0f}ms "
                     f"total={t.total_seconds * 1000:.0f}ms")
    return "[" + " ".join(parts) + "]"


def cmd_generate(args: argparse.Namespace, client: SwitchboardClient, **input_: Any) -> None:
    params = {**generation_params(args), **input_}
    if not args.stream:
        result = client.generate(**params)
        if args.json:
            _print_json(result)
            return
        print(result.text)
        if args.token_ids:
            print(f"token_ids: {result.token_ids}")
        if args.logprobs:
            print(f"logprobs: {[round(x, 4) for x in result.logprobs]}")
        print(_generation_footer(result), file=sys.stderr)
        return
    chunks = []
    for chunk in client.generate_stream(**params):
        chunks.append(chunk)
        if args.json:
            print(json.dumps(chunk.to_dict(), ensure_ascii=False), flush=True)
        else:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    if not args.json:
        print()
        result = convert.result_from_chunks(chunks)
        if args.token_ids:
            print(f"token_ids: {result.token_ids}")
        print(_generation_footer(result), file=sys.stderr)


def cmd_adapters(args: argparse.Namespace, client: SwitchboardClient) -> None:
    if args.adapters_command == "list":
        adapters = client.list_adapters()
        if args.json:
            _print_json(adapters)
            return
        if not adapters:
            print("no adapters")
            return
        header = f"{'ADAPTER':<28}{'METHOD':<15}{'VERSION':<12}{'TIER':<8}{'RANK':>5}{'SIZE':>11}"
        print(header)
        for a in adapters:
            print(f"{a.adapter_id:<28}{a.method:<15}{a.version:<12}{a.tier:<8}{a.rank:>5}"
                  f"{_size(a.size_bytes):>11}")
    elif args.adapters_command == "load":
        result = client.load_adapter(args.adapter_id, args.path)
        if args.json:
            _print_json(result)
            return
        a = result.adapter
        verb = "replaced" if result.replaced else "loaded"
        print(f"{verb} {a.adapter_id}: {a.method} rank {a.rank}, version {a.version}, "
              f"{_size(a.size_bytes)}, tier {a.tier}")
    else:
        unloaded = client.unload_adapter(args.adapter_id)
        if args.json:
            _print_json({"adapter_id": args.adapter_id, "unloaded": unloaded})
            return
        print(f"unloaded {args.adapter_id}" if unloaded else f"{args.adapter_id} was not loaded")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_health(args: argparse.Namespace, client: SwitchboardClient) -> int:
    statuses = client.health_all(args.service)
    if args.json:
        _print_json(statuses)
    else:
        for endpoint, status in statuses.items():
            print(f"{endpoint}: {status}")
    return 0 if all(s == "SERVING" for s in statuses.values()) else EXIT_ERROR


def cmd_info(args: argparse.Namespace, client: SwitchboardClient) -> None:
    info = client.model_info()
    if args.json:
        _print_json(info)
        return
    for key, value in info.to_dict().items():
        if key == "memory":
            value = ", ".join(f"{k} {_size(v)}" for k, v in value.items()) or "-"
        print(f"{key:<22}{value}")


def loadtest_config(args: argparse.Namespace):
    from .loadtest import LoadTestConfig
    from .workload import expand_adapter_ids

    if args.num_adapters is not None:
        adapters = expand_adapter_ids(args.num_adapters, args.adapter_pattern)
    elif args.adapters is not None:
        adapters = ["" if a.strip() in ("", "base") else a.strip()
                    for a in args.adapters.split(",")]
    else:
        adapters = [""]
    duration = args.duration
    if duration is None and args.requests is None:
        duration = 30.0
    opts = client_options(args)
    opts.pop("api_key")
    opts.pop("timeout")
    return LoadTestConfig(
        target=args.target, concurrency=args.concurrency, rate=args.rate,
        duration_s=duration, num_requests=args.requests, adapters=tuple(adapters),
        distribution="weights" if args.weights_file else args.mix,
        zipf_exponent=args.zipf_exponent, weights_file=args.weights_file,
        prompts_file=args.prompts, max_new_tokens=args.max_new_tokens,
        ignore_eos=args.ignore_eos, temperature=args.temperature, stream=not args.no_stream,
        seed=args.seed, timeout_s=args.timeout or 300.0, max_in_flight=args.max_in_flight,
        progress=not args.no_progress and not args.json, api_key=args.api_key,
        client_options={k: v for k, v in opts.items() if v not in (None, False)},
    )


def cmd_loadtest(args: argparse.Namespace) -> int:
    from .loadtest import format_summary, run_loadtest

    result = run_loadtest(loadtest_config(args))
    if args.output:
        result.write_json(args.output, include_records=args.records)
    if args.plot:
        from .plot import plot_loadtest

        plot_loadtest(result, args.plot)
    if args.json:
        print(json.dumps(result.to_dict(include_records=args.records), indent=2))
    else:
        print(format_summary(result))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0 if result.requests_ok else EXIT_ERROR


def run(args: argparse.Namespace) -> int:
    if args.command == "loadtest":
        return cmd_loadtest(args)
    with client_from_args(args) as client:
        if args.command == "generate":
            cmd_generate(args, client, prompt=_read_arg(args.prompt))
        elif args.command == "chat":
            cmd_generate(args, client, messages=chat_messages(args))
        elif args.command == "tokenize":
            result = client.tokenize(_read_arg(args.prompt))
            if args.json:
                _print_json(result)
            else:
                pairs = zip(result.token_ids, result.tokens, strict=False)
                print(" ".join(f"{t}:{tok!r}" for t, tok in pairs))
                print(f"[{len(result.token_ids)} tokens]", file=sys.stderr)
        elif args.command == "adapters":
            cmd_adapters(args, client)
        elif args.command == "health":
            return cmd_health(args, client)
        elif args.command == "info":
            cmd_info(args, client)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except SwitchboardError as err:
        print(f"error: {err.code.name}: {err.details}", file=sys.stderr)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
