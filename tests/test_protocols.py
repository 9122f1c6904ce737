"""Evaluation protocols: each reproduces a reference evaluation's prompt, decoding and token limit."""

from __future__ import annotations

import json

import pytest

from downstream.protocols import (LLAVA_MED_OPTION_SUFFIX, PROTOCOLS, EvalSettings, Protocol, ProtocolError,
                                  clean_answer, format_question, generation_arguments, get_protocol, register_protocol)
from downstream.synthetic import VQAItem, write_vqa_rad_original
from medvlm.imaging import load_image
from medvlm.sample_images import sample_path


def _items() -> list[VQAItem]:
    ct = load_image(sample_path("CT_small.dcm", "pydicom"))
    return [VQAItem(ct, "ct_a", "Is this a CT scan?", "yes", "CLOSED", "train", {}),
            VQAItem(ct, "ct_a", "What modality is shown?", "CT", "OPEN", "train", {}),
            VQAItem(ct.rotate(90), "ct_b", "Is this a CT scan?", "yes", "CLOSED", "test", {}),
            VQAItem(ct.rotate(90), "ct_b", "What modality is shown?", "CT", "OPEN", "test", {})]


def test_option_suffix_is_llava_meds_text_exactly():
    assert LLAVA_MED_OPTION_SUFFIX == " Please choose from the following two options: [yes, no]"
    protocol = get_protocol("llava_med_v1")
    assert format_question(protocol, "Is it CT?", "closed") == "Is it CT? Please choose from the following two options: [yes, no]"
    assert format_question(protocol, "What organ?", "open") == "What organ?"


def test_option_suffix_is_not_added_twice_to_llava_med_test_questions():
    protocol = get_protocol("llava_med_v1")
    already = "Is it CT? Please choose from the following two options: [Yes, No]"
    assert format_question(protocol, already, "closed") == already


def test_short_answer_protocol_appends_llava_1_5_instruction():
    protocol = get_protocol("llava_1_5_short")
    assert format_question(protocol, "Is it CT?", "closed") == (
        "Is it CT?\nAnswer the question using a single word or phrase.")
    assert protocol.template == "vicuna_v1" and protocol.temperature == 0 and protocol.max_new_tokens == 128


def test_llava_med_v1_samples_long_answers_with_the_question_first():
    protocol = get_protocol("llava_med_v1")
    assert (protocol.template, protocol.image_first, protocol.max_new_tokens) == ("simple", False, 1024)
    args = generation_arguments(protocol, tokenizer="tok", stop_strings=("###",))
    assert args == {"do_sample": True, "temperature": 0.7, "stop_strings": ["###"], "tokenizer": "tok"}


def test_greedy_protocols_do_not_sample():
    for name in ("medvlm", "llava_med_v1_5", "llava_1_5_short"):
        assert generation_arguments(PROTOCOLS[name], tokenizer=None) == {"do_sample": False}


def test_simple_template_answers_lose_the_role_name_and_stop_signal():
    assert clean_answer("Assistant: Yes, it is a CT.###Human: thanks", ("###",), "Assistant:") == "Yes, it is a CT."


def test_unknown_protocol_names_the_choices():
    with pytest.raises(ProtocolError, match="llava_med_v1, llava_med_v1_5"):
        EvalSettings(protocol="llava_med")


def test_a_toy_protocol_is_one_registered_unit(registered):
    from medvlm.cli import build_parser

    registered(register_protocol, PROTOCOLS, Protocol("toy", "plain", True, "", " Briefly.", 0.0, 8, source="a test"))
    settings = EvalSettings.from_mapping({"protocol": "toy", "split": "test"})  # an eval stage's keys
    assert settings.tokens == 8 and format_question(settings.spec, "Is it CT?", "closed") == "Is it CT? Briefly."
    args = build_parser().parse_args(["eval", "--model", "m", "--dataset", "vqa-rad", "--root", "r",
                                      "--protocol", "toy"])
    assert args.protocol == "toy"                                               # the CLI's choices read the registry
    with pytest.raises(ValueError, match="registered already"):
        register_protocol(Protocol("toy", None, True, "", "", 0.0, 16))


def test_settings_from_a_curriculum_stage_keep_only_evaluation_keys():
    settings = EvalSettings.from_mapping({"split": "test", "baseline": True, "protocol": "llava_1_5_short",
                                          "batch_size": 4})
    assert (settings.protocol, settings.batch_size, settings.tokens) == ("llava_1_5_short", 4, 128)
    assert settings.with_(max_new_tokens=8).tokens == 8


def test_evaluation_uses_the_protocols_layout_decoding_and_limit(tmp_path, monkeypatch):
    from downstream.datasets import load_vqa
    from downstream.evaluate import evaluate_model
    from medvlm import generate
    from medvlm.model import build_tiny

    seen = {}

    def fake_generate(bundle, questions, images, **kw):
        seen.update(questions=questions, **kw)
        return ["Assistant: yes###Human: more"] * len(questions)

    monkeypatch.setattr(generate, "generate_answers", fake_generate)
    root = write_vqa_rad_original(tmp_path / "rad", _items())
    records, _ = load_vqa("vqa-rad", root, "test")
    result = evaluate_model(build_tiny(), records, tmp_path / "eval", EvalSettings(protocol="llava_med_v1"),
                            progress=False)
    assert seen["template"] == "simple" and seen["image_first"] is False and seen["max_new_tokens"] == 1024
    assert seen["generation"]["do_sample"] and seen["generation"]["stop_strings"] == ["###"]
    assert "Is this a CT scan? Please choose from the following two options: [yes, no]" in seen["questions"]
    answers = [json.loads(line) for line in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    assert {a["prediction"] for a in answers} == {"yes"}
    assert result["settings"]["protocol"] == "llava_med_v1" and result["settings"]["temperature"] == 0.7


def test_sampled_protocol_runs_on_the_tiny_model_and_is_seeded(tmp_path):
    from downstream.datasets import load_vqa
    from downstream.evaluate import evaluate_model
    from medvlm.model import build_tiny

    root = write_vqa_rad_original(tmp_path / "rad", _items())
    records, _ = load_vqa("vqa-rad", root, "test")
    bundle = build_tiny()
    runs = []
    for name in ("a", "b"):
        evaluate_model(bundle, records, tmp_path / name, EvalSettings(protocol="llava_med_v1", max_new_tokens=6),
                       progress=False)
        runs.append((tmp_path / name / "answers.jsonl").read_text())
    assert runs[0] == runs[1]


def test_finetune_questions_are_laid_out_as_the_protocol_poses_them(tmp_path):
    from downstream.finetune import prepare_finetune_data

    root = write_vqa_rad_original(tmp_path / "rad", _items())
    path, _, _ = prepare_finetune_data("vqa-rad", root, tmp_path / "data", protocol="llava_med_v1")
    humans = {c["conversations"][0]["value"] for c in json.loads(path.read_text())}
    assert humans == {"Is this a CT scan? Please choose from the following two options: [yes, no]\n<image>",
                      "What modality is shown?\n<image>"}
    path, _, _ = prepare_finetune_data("vqa-rad", root, tmp_path / "default")
    assert "<image>\nIs this a CT scan?" in {c["conversations"][0]["value"] for c in json.loads(path.read_text())}


def _curriculum(**eval_stage) -> dict:
    return {"name": "p", "model": {"preset": "tiny"},
            "stages": [{"name": "eval", "kind": "eval", "split": "test",
                        "datasets": [{"name": "vqa-rad", "root": "vqa"}], **eval_stage}]}


def test_curriculum_eval_stage_takes_a_protocol_and_refuses_an_unknown_one_before_running(tmp_path):
    from curricula.plan import build_plan
    from medvlm.config import ConfigError

    plan = build_plan(_curriculum(protocol="llava_1_5_short"), tmp_path, hash_inputs=False)
    node = next(n for n in plan.nodes if n.kind == "eval")
    assert EvalSettings.from_mapping(node.settings).spec.template == "vicuna_v1"
    with pytest.raises(ConfigError, match="stage eval: unknown protocol 'llava_med'; choose one of medvlm"):
        build_plan(_curriculum(protocol="llava_med"), tmp_path, hash_inputs=False)


def _fake_finetune(tmp_path, monkeypatch):
    """A VQA-RAD set under ``tmp_path/rad``, and finetune's trainer replaced by one that records its config:
    (the set's root, ``seen``)."""
    from types import SimpleNamespace

    from downstream import finetune

    seen = {}

    def fake_train(config):
        seen["config"] = config
        return SimpleNamespace(checkpoint=tmp_path / "ft" / "checkpoint", output_dir=tmp_path / "ft")

    monkeypatch.setattr(finetune, "train_stage", fake_train)
    return write_vqa_rad_original(tmp_path / "rad", _items()), seen


@pytest.mark.parametrize("world, accumulation", [(None, 8), ("8", 1), ("2", 4)])
def test_finetune_defaults_to_llava_meds_global_batch_of_64(tmp_path, monkeypatch, world, accumulation):
    from downstream.finetune import finetune

    root, seen = _fake_finetune(tmp_path, monkeypatch)
    if world:
        monkeypatch.setenv("WORLD_SIZE", world)
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    finetune("vqa-rad", root, {"preset": "tiny"}, tmp_path / "ft")
    assert (seen["config"].batch_size, seen["config"].grad_accum) == (8, accumulation)


def test_finetune_keeps_a_batch_size_the_user_chose(tmp_path, monkeypatch):
    from downstream.finetune import finetune

    root, seen = _fake_finetune(tmp_path, monkeypatch)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    finetune("vqa-rad", root, {"preset": "tiny"}, tmp_path / "ft", ["batch_size=3"])
    assert (seen["config"].batch_size, seen["config"].grad_accum) == (3, 1)


def test_cli_eval_and_finetune_take_a_protocol(tmp_path, monkeypatch):
    from downstream import evaluate
    from medvlm import device
    from medvlm.cli import main

    root, seen = _fake_finetune(tmp_path, monkeypatch)
    assert main(["finetune", "--dataset", "vqa-rad", "--root", str(root), "--model", "m", "--out",
                 str(tmp_path / "ft"), "--protocol", "llava_1_5_short"]) == 0
    data = json.loads((tmp_path / "ft" / "data" / "vqa-rad_train.json").read_text())
    assert data[0]["conversations"][0]["value"].endswith("Answer the question using a single word or phrase.")

    def fake_evaluate(bundle, records, out, settings, **kw):
        seen["settings"] = settings
        return {"suites": {}, "groups": {}}

    monkeypatch.setattr(evaluate, "evaluate_model", fake_evaluate)
    monkeypatch.setattr(device, "load_for_inference", lambda *args, **kw: None)
    monkeypatch.setattr("downstream.metrics.format_table", lambda result, suites: "table")
    assert main(["eval", "--model", "m", "--dataset", "vqa-rad", "--root", str(root), "--out", str(tmp_path / "e"),
                 "--protocol", "llava_med_v1"]) == 0
    settings = seen["settings"]
    assert (settings.protocol, settings.tokens, settings.option_suffix) == ("llava_med_v1", 1024, None)
    assert main(["eval", "--model", "m", "--dataset", "vqa-rad", "--root", str(root), "--out", str(tmp_path / "e"),
                 "--protocol", "llava_med_v1", "--no-option-suffix"]) == 0
    assert format_question(seen["settings"].spec, "Is it CT?", "closed", seen["settings"].option_suffix) == "Is it CT?"
