"""Experiment trackers (``report_to``): TensorBoard event files read back, MLflow with a local SQLite store."""

from __future__ import annotations

import json

import pytest

from medvlm.config import ConfigError
from medvlm.tracking import TrackerError, flat_config
from tests.conftest import stage_config


def _losses(output_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_tensorboard_is_the_default_and_its_events_hold_the_loss(colour_set, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medvlm.trainer import train_stage

    data, images = colour_set
    result = train_stage(stage_config(data, images, tmp_path / "out", max_steps=3, name="align"))
    runs = list((tmp_path / "out" / "tensorboard" / "medvlm").rglob("events.out.tfevents.*"))
    assert runs, "no TensorBoard event file"
    events = EventAccumulator(str(runs[0].parent)).Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged.keys() == _losses(result.output_dir).keys() == {1, 2, 3}
    for step, loss in _losses(result.output_dir).items():
        assert logged[step] == pytest.approx(loss, rel=1e-5)
    assert events.Scalars("final/global_step")[0].value == 3


def test_mlflow_run_gets_the_config_the_loss_and_the_final_metrics(colour_set, tmp_path, monkeypatch):
    import mlflow

    from medvlm.trainer import train_stage

    # a local store: MLflow 3 keeps runs in a SQLite file (its plain-folder store is deprecated)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data, images = colour_set
    train_stage(stage_config(data, images, tmp_path / "out", max_steps=2, name="bio_align", report_to=["mlflow"],
                             project="llava-med-test", run_name="bio_align-1"))
    runs = mlflow.search_runs(experiment_names=["llava-med-test"], output_format="list")
    assert [r.info.run_name for r in runs] == ["bio_align-1"]
    run = runs[0]
    assert run.data.params["lr"] == "0.001" and run.data.params["lora.r"] == "8"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2]
    assert run.data.metrics["final/global_step"] == 2
    assert not (tmp_path / "out" / "tensorboard").exists()


def test_no_trackers_writes_no_tracker_files(colour_set, tmp_path):
    from medvlm.trainer import train_stage

    data, images = colour_set
    train_stage(stage_config(data, images, tmp_path / "out", max_steps=1, report_to=[]))
    assert not (tmp_path / "out" / "tensorboard").exists()


def test_an_unknown_tracker_is_a_config_error_with_a_suggestion(colour_set, tmp_path):
    data, images = colour_set
    with pytest.raises(ConfigError, match="did you mean 'mlflow'"):
        stage_config(data, images, tmp_path / "out", report_to=["mlfow"])


def test_a_tracker_whose_package_is_missing_is_refused_not_dropped(colour_set, tmp_path, monkeypatch):
    import accelerate.tracking

    from medvlm.trainer import train_stage

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    data, images = colour_set
    with pytest.raises(TrackerError, match="pip install wandb"):
        train_stage(stage_config(data, images, tmp_path / "out", max_steps=1, report_to=["wandb"]))


def test_config_is_flattened_to_scalars_for_hyperparameter_panels():
    flat = flat_config({"lr": 1e-3, "lora": {"r": 8}, "data": [{"path": "a.json"}], "template": None})
    assert flat == {"lr": 1e-3, "lora.r": 8, "data": '[{"path": "a.json"}]', "template": "none"}


def test_a_curriculum_puts_its_eval_scores_in_the_card_and_the_trackers(tmp_path):
    """train → eval: the trained checkpoint's card gets model-index results; TensorBoard gets the scores
    (eval stage folder) and the training loss (under the curriculum's name as project)."""
    import yaml
    from huggingface_hub import ModelCard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from curricula.runner import run_curriculum
    from tests.conftest import make_colour_set
    from tests.ecosystem_data import write_vqa

    make_colour_set(tmp_path / "data", n=8)
    write_vqa(tmp_path)
    stages = [{"name": "align", "kind": "train", "trainable": "projector", "template": "plain", "lr": 1e-3,
               "max_steps": 2, "log_steps": 1, "data": [{"path": "data/conversations.json", "images": "data/images"}]},
              {"name": "eval", "kind": "eval", "datasets": [{"name": "vqa-rad", "root": "vqa_rad"}], "max_new_tokens": 4}]
    path = tmp_path / "curriculum.yaml"
    path.write_text(yaml.safe_dump({"name": "cardtest", "model": {"preset": "tiny"}, "stages": stages}))
    run = tmp_path / "run"
    summary = run_curriculum(path, run)
    strict = summary["after"]["closed_accuracy"]

    (align,) = (run / "stages").glob("align-*")
    (evaluation,) = (run / "stages").glob("eval-*")
    card = ModelCard.load(align / "checkpoint" / "README.md")
    scores = {(r.dataset_name, r.metric_config, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert scores[("vqa-rad", "strict", "closed_accuracy")] == strict
    events = EventAccumulator(str(next((evaluation / "tensorboard").rglob("events.*")).parent)).Reload()
    assert events.Scalars("eval/vqa-rad/strict.closed_accuracy")[0].value == pytest.approx(strict)
    assert list((align / "tensorboard" / "cardtest").rglob("events.*"))
