"""`switchboard serve ...`"""

from __future__ import annotations

import argparse
import logging
import sys

from server.config import add_serve_arguments, config_from_args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="switchboard",
                                     description="Multi-adapter LLM inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(sub.add_parser("serve", help="serve the gRPC API"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    config = config_from_args(args)
    from server.app import serve

    sys.exit(serve(config))


if __name__ == "__main__":
    main()
