"""Model cards in exported checkpoints (Hub format, lineage, scores, licenses) and ``medvlm push``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from tests.ecosystem_data import write_alignment_data, write_eval, write_pairs
from medvlm.modelcard import CARD_FILE, PushError, add_evaluation, add_stage, evaluation_record, push


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A projector stage trained on alignment data from a real PMC pairs table (CC BY + CC BY-NC figures)."""
    from tests.conftest import stage_config
    from medvlm.trainer import train_stage

    root = tmp_path_factory.mktemp("card")
    pairs = write_pairs(root)
    data = write_alignment_data(pairs)
    config = stage_config(data, pairs, root / "bio_align", name="bio_align", trainable="projector", template="plain",
                          max_steps=2)
    return root, data, train_stage(config)


def test_exported_checkpoint_has_a_hub_model_card(trained):
    _, data, result = trained
    card = ModelCard.load(result.checkpoint / CARD_FILE)
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-text-to-text"
    assert "## How to use" in card.text and "LlavaForConditionalGeneration.from_pretrained" in card.text


def test_card_lists_the_stage_data_hash_size_and_hyperparameters(trained):
    _, data, result = trained
    lineage = json.loads((result.checkpoint / "medvlm.json").read_text())["lineage"]
    assert [s["name"] for s in lineage] == ["bio_align"]
    stage = lineage[0]
    assert stage["data"][0]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert stage["data"][0]["bytes"] == data.stat().st_size
    assert stage["hyperparameters"]["lr"] == 1e-3 and stage["steps"] == 2 and stage["seconds"] > 0
    text = (result.checkpoint / CARD_FILE).read_text()
    assert stage["data"][0]["sha256"] in text and "lr=0.001" in text


def test_card_counts_pmc_licenses_and_flags_non_commercial_figures(trained):
    _, _, result = trained
    stage = json.loads((result.checkpoint / "medvlm.json").read_text())["lineage"][0]
    assert stage["data"][0]["licenses"] == {"CC BY": 2, "CC BY-NC": 1}
    assert "1 figure(s) come from articles under non-commercial (NC) licenses" in (result.checkpoint / CARD_FILE).read_text()


def test_next_stage_inherits_the_lineage_and_drops_old_scores(trained, tmp_path):
    from medvlm.model import load_checkpoint, save_folder

    root, _, result = trained
    add_evaluation(result.checkpoint, {"dataset": "vqa-rad", "split": "test", "suites": {}, "settings": {}})
    bundle = load_checkpoint(result.checkpoint)
    save_folder(bundle, tmp_path / "next")
    record = {"name": "bio_instruct", "trainable": "projector+llm", "data": [], "hyperparameters": {"lr": 2e-5}}
    add_stage(tmp_path / "next", record)
    meta = json.loads((tmp_path / "next" / "medvlm.json").read_text())
    assert [s["name"] for s in meta["lineage"]] == ["bio_align", "bio_instruct"]
    assert meta["evaluations"] == []
    text = (tmp_path / "next" / CARD_FILE).read_text()
    assert text.index("### 1. bio_align") < text.index("### 2. bio_instruct")


def test_scores_become_model_index_results_with_intervals(trained, tmp_path):
    from medvlm.model import load_checkpoint

    _, _, result = trained
    metrics = json.loads((write_eval(tmp_path, load_checkpoint(result.checkpoint)) / "metrics.json").read_text())
    add_evaluation(result.checkpoint, evaluation_record("vqa-rad", "test", metrics))
    card = ModelCard.load(result.checkpoint / CARD_FILE)
    by_key = {(r.metric_config, r.metric_type): r for r in card.data.eval_results}
    strict = by_key[("strict", "closed_accuracy")]
    assert strict.dataset_name == "vqa-rad" and strict.dataset_split == "test"
    assert strict.metric_value == metrics["suites"]["strict"]["closed_accuracy"]
    low, high = metrics["suites"]["strict"]["closed_accuracy_ci"]
    assert f"95% CI {low}–{high}" in strict.metric_name
    assert {suite for suite, _ in by_key} == set(metrics["suites"])


def test_evaluating_again_replaces_the_scores_of_that_data_set(trained):
    _, _, result = trained
    suites = {"strict": {"closed_accuracy": 50.0, "closed_accuracy_ci": [40.0, 60.0]}}
    add_evaluation(result.checkpoint, {"dataset": "slake", "split": "test", "suites": suites})
    add_evaluation(result.checkpoint, {"dataset": "slake", "split": "test",
                                       "suites": {"strict": {**suites["strict"], "closed_accuracy": 55.0}}})
    card = ModelCard.load(result.checkpoint / CARD_FILE)
    slake = [r.metric_value for r in card.data.eval_results if r.dataset_name == "slake"]
    assert slake == [55.0]


def test_push_dry_run_lists_the_files_and_uploads_nothing(trained, tmp_path):
    _, _, result = trained
    out = push(result.checkpoint, "someone/medvlm-tiny", dry_run=True)
    names = [name for name, _ in out["files"]]
    assert {"config.json", "model.safetensors", CARD_FILE, "medvlm.json"} <= set(names)
    assert "COMPLETE" not in names and out["uploaded"] is False


def test_push_to_a_local_folder_gives_a_loadable_checkpoint_with_its_card(trained, tmp_path):
    from transformers import LlavaForConditionalGeneration

    _, _, result = trained
    out = push(result.checkpoint, str(tmp_path / "store" / "tiny"))
    assert out["uploaded"] is True
    assert (tmp_path / "store" / "tiny" / CARD_FILE).read_text() == (result.checkpoint / CARD_FILE).read_text()
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "store" / "tiny")


def test_push_refuses_a_local_target_that_holds_something_else(trained, tmp_path):
    _, _, result = trained
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(PushError, match="not a model folder"):
        push(result.checkpoint, str(tmp_path / "notes"))
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_push_rejects_a_malformed_repo_id(trained):
    _, _, result = trained
    with pytest.raises(PushError, match="not a Hub repository id"):
        push(result.checkpoint, "no spaces allowed/in ids", dry_run=True)


def test_push_needs_a_checkpoint_folder(tmp_path):
    with pytest.raises(PushError, match="no config.json"):
        push(tmp_path, "someone/x", dry_run=True)


def test_push_command_dry_run_prints_the_files(trained, capsys):
    from medvlm.cli import main

    _, _, result = trained
    assert main(["push", str(result.checkpoint), "--repo", "someone/medvlm-tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors" in out and CARD_FILE in out and "would go to someone/medvlm-tiny" in out


def test_push_command_names_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    from medvlm.cli import main

    assert main(["push", str(tmp_path), "--repo", "someone/x", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no config.json" in err


def test_a_data_file_gone_by_export_time_is_recorded_not_fatal(tmp_path):
    from medvlm.modelcard import data_file_record

    assert data_file_record(str(tmp_path / "moved.json"), None) == {
        "path": str(tmp_path / "moved.json"), "images": None, "sha256": None, "bytes": None}


def test_licenses_are_skipped_when_the_data_file_is_not_conversations(trained, tmp_path):
    from medvlm.modelcard import data_file_record

    root, _, _ = trained
    odd = tmp_path / "odd.json"
    odd.write_text('{"not": "a list"}')
    record = data_file_record(str(odd), str(root / "pairs"))
    assert record["sha256"] and "licenses" not in record
