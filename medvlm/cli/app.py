"""Build the ``medvlm`` parser from the command-group modules and run the chosen handler.

A user error (bad config, missing file, unreadable data) is printed as one line on stderr with a
non-zero exit code instead of a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from medvlm.cli import chat, curriculum, demo, evaluate, finetune, ingest, train

GROUPS = (train, chat, ingest, finetune, evaluate, demo, curriculum)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medvlm", description="LLaVA-style vision-language models for biomedicine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    from medvlm.config import ConfigError
    from medvlm.data import DataError
    from medvlm.imaging import ImageLoadError

    try:
        return int(args.handler(args) or 0)
    except (ConfigError, DataError, ImageLoadError, FileNotFoundError) as exc:
        print(f"medvlm: error: {exc}", file=sys.stderr)
        return 2
