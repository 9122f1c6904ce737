"""Curriculum stage kinds: one registered unit per kind.

A ``StageKind`` says which keys a stage of that kind accepts, how it fans out over data sets, how its
settings are built and checked, whether it produces weights (a ``checkpoint/`` the next stage starts
from, whose ``COMPLETE`` marker records that the stage finished) and how it runs. The planner
(``plan.py``) validates stages against ``KINDS`` and the runner (``runner.py``) dispatches on it, so a new
kind is one ``register(StageKind(...))`` here and nowhere else.

Shipped kinds: ``train`` (any ``StageConfig`` key), ``finetune`` (``datasets`` fan out: one branch per
set, each from the same parent), ``eval`` (each branch's model on its set's ``split``; ``baseline: true``
also scores the curriculum's starting model).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from medvlm import registry
from medvlm.config import ConfigError, StageConfig, from_dict

if TYPE_CHECKING:
    from .plan import Node
    from .runner import CurriculumRunner

STAGE_KEYS = frozenset({"name", "kind", "skip"})   # every kind
TRAIN_KEYS = frozenset(f.name for f in dataclasses.fields(StageConfig)) - {"model", "output_dir", "init_projector"}
EVAL_KEYS = frozenset({"split", "datasets", "baseline", "closed_mode", "option_suffix", "batch_size",
                       "max_new_tokens", "suites", "feature_cache", "protocol", "seed"})


@dataclass(frozen=True)
class StageKind:
    name: str
    keys: frozenset                                          # accepted stage keys (besides name, kind, skip)
    produces_weights: bool
    fan_out: Callable[[dict, "Node | None"], list]           # (stage, parent) → a data set (or None) per node
    settings: Callable[[dict, dict], dict]                   # (stage, curriculum defaults) → node settings
    run: Callable[["CurriculumRunner", "Node"], dict]        # → the metrics recorded in stage.json


KINDS: dict[str, StageKind] = {}


def register(kind: StageKind) -> StageKind:
    """Make ``kind`` a stage ``kind:`` that curricula validate and run; a taken name is refused."""
    return registry.register(KINDS, kind.name, kind)


def kind_of(stage: dict) -> StageKind:
    name = stage.get("kind", "train")
    if name not in KINDS:
        import difflib

        close = difflib.get_close_matches(str(name), KINDS, n=1)
        raise ConfigError(f"stage {stage.get('name')}: kind {name!r} is not one of {', '.join(KINDS)}"
                          + (f"; did you mean '{close[0]}'?" if close else ""))
    return KINDS[name]


# ------------------------------------------------------------------------------------ shared pieces
def _own(stage: dict) -> dict:
    return {k: v for k, v in stage.items() if k not in ("name", "kind", "datasets", "skip")}


def _training_settings(stage: dict, defaults: dict, extra_keys: frozenset = frozenset()) -> dict:
    """Curriculum defaults under the stage's own keys, validated now rather than hours into a run."""
    settings = {**defaults, **_own(stage)}
    try:
        from_dict(StageConfig, {k: v for k, v in settings.items() if k not in extra_keys})
    except ConfigError as exc:
        raise ConfigError(f"stage {stage['name']}: {exc}") from exc
    return settings


def _one(stage: dict, parent) -> list:
    return [None]


def _listed_datasets(stage: dict, parent) -> list[dict]:
    datasets = stage.get("datasets")
    if not datasets:
        raise ConfigError(f"stage {stage['name']}: a {stage.get('kind')} stage needs 'datasets: [{{name, root}}]'")
    return [d if isinstance(d, dict) else {"name": d} for d in datasets]


def _inherited_or_listed(stage: dict, parent) -> list[dict]:
    node = parent
    while node is not None:  # an eval after a finetune scores that branch's data set
        if node.dataset is not None:
            return [node.dataset]
        node = node.parent
    if not stage.get("datasets"):
        raise ConfigError(f"stage {stage['name']}: an eval stage needs 'datasets' unless it follows a finetune")
    return _listed_datasets(stage, parent)


def _eval_settings(stage: dict) -> dict:
    """The stage's own keys, its evaluation settings checked now (protocol name, closed mode, limits)."""
    from downstream.protocols import EvalSettings, ProtocolError

    settings = _own(stage)
    try:
        EvalSettings.from_mapping(settings)
    except (ProtocolError, TypeError) as exc:
        raise ConfigError(f"stage {stage['name']}: {exc}") from exc
    return settings


# ------------------------------------------------------------------------------------ the kinds
def _run_train(runner: "CurriculumRunner", node: "Node") -> dict:
    from medvlm.trainer import train_stage

    from .plan import resolve_source

    settings = dict(node.settings)
    settings["data"] = [resolve_source(runner.plan.base_dir, s) for s in settings.get("data") or []]
    settings.update(name=node.name, model=runner.model_source(node), output_dir=str(runner.folder(node)))
    settings.setdefault("project", runner.plan.name)  # trackers: the curriculum is the project, a stage a run
    return runner.trained(node, train_stage(from_dict(StageConfig, settings)))


def _run_finetune(runner: "CurriculumRunner", node: "Node") -> dict:
    from downstream.finetune import finetune

    from .plan import resolve

    settings = {k: v for k, v in node.settings.items() if k != "lang"}
    settings.setdefault("project", runner.plan.name)
    root = resolve(runner.plan.base_dir, node.dataset["root"])
    result = finetune(node.dataset["name"], root, runner.model_source(node), runner.folder(node), base=settings,
                      lang=node.settings.get("lang", "en"))
    return runner.trained(node, result)


def _run_eval(runner: "CurriculumRunner", node: "Node") -> dict:
    out: Path = runner.folder(node)
    metrics: dict = {}
    # every rank evaluates its share of the questions; rank 0 gathers and scores (downstream/evaluate.py)
    metrics["after"] = runner.evaluate(node, runner.model_source(node), out)
    runner.record_scores(node, metrics["after"])
    if node.settings.get("baseline"):
        metrics["before"] = runner.evaluate(node, runner.root_source(), out / "baseline")
    return metrics


register(StageKind("train", TRAIN_KEYS, True, _one, _training_settings, _run_train))
register(StageKind("finetune", TRAIN_KEYS | {"datasets", "lang", "protocol"}, True, _listed_datasets,
                   lambda stage, defaults: _training_settings(stage, defaults, frozenset({"lang", "protocol"})),
                   _run_finetune))
register(StageKind("eval", EVAL_KEYS, False, _inherited_or_listed, lambda stage, defaults: _eval_settings(stage),
                   _run_eval))
