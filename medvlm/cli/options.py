"""The parser class every ``medvlm`` (sub)command uses, and options several command groups share.

``CommandParser`` shows each option's default in ``--help`` and accepts ``--debug`` / ``-v`` after any
subcommand (``medvlm eval score ... --debug``), not only before it. ``add_subparsers`` makes nested
parsers of the same class, so group modules get this without doing anything.
"""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help when it has a meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default in (None, argparse.SUPPRESS) or default == []
                or not action.option_strings or action.nargs == 0):   # nargs 0: on/off flags
            return text
        return f"{text} (default: %(default)s)".strip()


class CommandParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand's parser must not reset a flag given before the subcommand
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="print the full traceback on errors")
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at INFO level")


    def add_subparsers(self, **kwargs):
        """A command group run without its subcommand (``medvlm ingest``) prints the group's own help."""
        if self.get_default("handler") is None:
            self.set_defaults(handler=self._print_help_for_usage)
        return super().add_subparsers(**kwargs)

    def _print_help_for_usage(self, args) -> int:
        from medvlm.cli.errors import USAGE

        self.print_help()
        return USAGE


def add_overrides(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--set KEY=VALUE`` (repeatable), collected into ``args.overrides``."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_device(parser: argparse.ArgumentParser) -> None:
    """``--device``: where a model runs for inference (``medvlm.device``: by default the accelerator)."""
    parser.add_argument("--device", help="where the model runs: cpu, cuda, cuda:N or mps (default: this process's GPU "
                                         "when there is one, bf16 where supported; else the CPU in fp32)")
