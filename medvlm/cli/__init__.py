"""The ``medvlm`` command, one module per command group.

``app`` builds the parser and turns user errors into one-line messages; each group module (``train``,
``chat``, ``ingest``, ``finetune``, ``evaluate``, ``demo``, ``curriculum``) registers its own subcommands
and holds thin handlers that parse, call library code and print where the outputs went. Library modules
never import from here.
"""

from medvlm.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
