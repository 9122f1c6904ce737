"""Build the ``medvlm`` parser from the command-group modules and run the chosen handler.

A user error ends the command with one line on stderr and an exit code per kind of error
(``medvlm.cli.errors``); ``--debug`` adds the traceback.
"""

from __future__ import annotations

import logging
import os
import sys

from medvlm.cli import chat, convert, curriculum, demo, errors, evaluate, finetune, ingest, push, report, train
from medvlm.cli.options import CommandParser

GROUPS = (train, chat, ingest, finetune, evaluate, demo, curriculum, report, push, convert)


def build_parser() -> CommandParser:
    parser = CommandParser(prog="medvlm", description="LLaVA-style vision-language models for biomedicine.",
                           epilog="exit codes: " + "; ".join(f"{code} {text}" for code, text in errors.EXIT_CODES.items()))
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("medvlm: interrupted (Ctrl+C); finished outputs are kept, run the same command again to go on",
              file=sys.stderr)
        return errors.CTRL_C
    except Exception as exc:  # noqa: BLE001 - every error becomes one line and an exit code
        return errors.report(exc, debug, sys.stderr)
