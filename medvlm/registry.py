"""Name → unit tables for the things users pick by name (data sets, metric suites, eval protocols,
conversation templates, curriculum stage kinds).

A registry is a plain dict filled by ``register`` calls next to each unit's definition; ``names(registry)``
is a live, read-only sequence of its keys for ``argparse`` choices and defaults, so a unit registered after
import (a plug-in, a test's toy) is offered everywhere without touching the CLI.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class RegisteredNames(Sequence):
    """The keys of a registry, read at each use, in registration order."""

    def __init__(self, registry: dict):
        self._registry = registry

    def __getitem__(self, index):
        return tuple(self._registry)[index]

    def __len__(self) -> int:
        return len(self._registry)

    def __contains__(self, name: object) -> bool:
        return name in self._registry

    def __repr__(self) -> str:
        return repr(tuple(self._registry))


def register(registry: dict[str, T], name: str, unit: T) -> T:
    """Add ``unit`` under ``name``; a second unit with the same name is refused (a silent replace hides bugs)."""
    if name in registry and registry[name] is not unit:
        raise ValueError(f"{name!r} is registered already; pick another name or unregister the first one")
    registry[name] = unit
    return unit


def lookup(registry: dict[str, T], name: str, what: str) -> T:
    """The unit called ``name``; a ValueError listing the registered names otherwise."""
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(registry)}")
    return registry[name]
