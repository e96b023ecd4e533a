"""The command line: ``python -m nnterp demo|run|validate`` (also the ``nnterp`` script).

Every command turns bad input into one line on stderr and a non-zero exit: a
researcher mistyping a path should read what is wrong, not a traceback. Unexpected
internal errors still show their traceback, since those are bugs to report.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

__all__ = ["main"]

DEMO_PROMPT = "The capital of France is"


class CommandError(Exception):
    """A user-facing failure of a command: printed as one line, exit status 2."""


def _demo(args: argparse.Namespace) -> int:
    from nnterp.demo import run_demo

    backends = ("hf", "vllm") if args.backend == "both" else (args.backend,)
    run_demo(backends=backends, prompt=args.prompt, max_tokens=args.max_tokens, out=sys.stdout)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnterp", description="Standardized interpretability on nnsight.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="a lens + steer graph on the bundled model, on both backends")
    demo.add_argument("--backend", choices=("hf", "vllm", "both"), default="both")
    demo.add_argument("--prompt", default=DEMO_PROMPT)
    demo.add_argument("--max-tokens", type=int, default=10)
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # read when vllm is first imported
    # a command-line program may quiet its libraries; the library itself never does
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except CommandError as err:
        print(f"nnterp {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nnterp {args.command}: interrupted", file=sys.stderr)
        return 130
