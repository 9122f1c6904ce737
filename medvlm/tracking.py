"""Experiment trackers through accelerate: ``report_to: [tensorboard, wandb, mlflow, trackio]``.

A stage's ``report_to`` (default ``[tensorboard]``: event files in ``OUTPUT_DIR/tensorboard/PROJECT/``,
offline) names the trackers; ``project`` is the W&B / trackio project and the MLflow experiment (a
curriculum sets its own name), ``run_name`` the run (default: the stage name). Each tracker gets the
stage config as hyperparameters, the training loss / learning rate / throughput every ``log_steps``, and
the final metrics; a curriculum's evaluations log their scores to the trackers of its ``defaults``
(``log_scores``). Where they go is the trackers' own business: ``WANDB_MODE=offline``,
``MLFLOW_TRACKING_URI=sqlite:///mlflow.db`` and the like work as those tools document.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


class TrackerError(ValueError):
    """A ``report_to`` entry that is unknown or whose package is missing; the message says what to install."""


def check_names(report_to: list[str]) -> None:
    for name in report_to:
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, TRACKERS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise TrackerError(f"report_to: unknown tracker {name!r}; {hint}choose from {', '.join(TRACKERS)} ([] for none)")


def check_installed(report_to: list[str]) -> None:
    """accelerate silently drops a tracker whose package is missing; we refuse instead."""
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    missing = [name for name in report_to if name not in available]
    if missing:
        raise TrackerError(f"report_to: {', '.join(missing)} not installed; pip install "
                           f"{' '.join(PACKAGES[m] for m in missing)} (or remove it from report_to)")


def accelerator_kwargs(config, output_dir: Path) -> dict:
    """``Accelerator(**kwargs)`` for the stage's trackers (empty when ``report_to`` is empty)."""
    if not config.report_to:
        return {}
    from accelerate.utils import ProjectConfiguration

    check_installed(config.report_to)
    return {"log_with": list(config.report_to),
            "project_config": ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "tensorboard"))}


def start(accelerator, config, output_dir: Path) -> None:
    """``init_trackers`` with the run name and the flattened stage config."""
    if not config.report_to:
        return
    from .config import to_dict

    init_kwargs = _init_kwargs(config.run_name or config.name, output_dir)
    accelerator.init_trackers(config.project, config=flat_config(to_dict(config)), init_kwargs=init_kwargs)


def flat_config(values: dict, prefix: str = "") -> dict:
    """Nested config → ``{"a.b": scalar}`` (TensorBoard's hparams take scalars and strings only)."""
    flat: dict = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = "none" if value is None else value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def numbers(values: dict, prefix: str) -> dict:
    """The numeric entries of ``values`` (nested dicts flattened) as ``{prefix/key: number}``."""
    out = {}
    for key, value in flat_config(values).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = value
    return out


def log_scores(report_to: list[str], project: str, run_name: str, output_dir: Path, scores: dict, step: int = 0) -> None:
    """Numbers from outside a training stage (a curriculum's evaluation) → a short run in each tracker."""
    if not report_to:
        return
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    check_installed(report_to)
    for name in report_to:
        tracker_class = LOGGER_TYPE_TO_CLASS[name]
        if name == "tensorboard":
            tracker = tracker_class(project, str(Path(output_dir) / "tensorboard"))
        else:
            tracker = tracker_class(project, **_init_kwargs(run_name, Path(output_dir))[name])
        tracker.start()
        tracker.log(scores, step=step)
        tracker.finish()


def _init_kwargs(run_name: str, output_dir: Path) -> dict:
    return {"wandb": {"name": run_name, "dir": str(output_dir)}, "mlflow": {"run_name": run_name},
            "trackio": {"name": run_name}}
