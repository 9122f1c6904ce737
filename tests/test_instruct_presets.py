"""Instruction-generation presets: ``--preset llava_med`` runs LLaVA-Med's recipe with its prompt, few-shot
examples and cleaning lists read from the user's own checkout (here a stand-in with placeholder texts)."""

from __future__ import annotations

import json

import pytest

from medvlm.cli import main
from pmc_ingest import reference_text
from pmc_ingest.instruct import InstructOptions, generate_instructions
from pmc_ingest.instruct_presets import clean_turns, get_preset, llava_med_context, llava_med_domain, split_turns
from tests.llava_med_checkout import CLEANING, SYSTEM, make_checkout
from tests.openai_server import FakeOpenAI
from tests.test_instruct import pairs  # noqa: F401 - the shared PMC pairs fixture


@pytest.fixture
def checkout(tmp_path):
    return make_checkout(tmp_path / "LLaVA-Med")


def test_context_puts_the_figure_label_before_the_caption_and_bullets_mentions():
    assert llava_med_context("Figure 2", "Chest X-ray.", ["As seen in Fig. 2.", "Effusion (Fig. 2)."], True) == (
        "Figure Caption:\nFigure 2: Chest X-ray.\n\nFigure Context:\n\t- As seen in Fig. 2.\n\t- Effusion (Fig. 2).")
    assert llava_med_context("Figure 2", "Chest X-ray.", ["m"], False) == "Figure Caption:\nFigure 2: Chest X-ray."


def test_reply_is_split_at_user_and_assistant():
    assert split_turns("Intro\nUser: q1\nAssistant: a1\n\nUser: q2 without answer\nUser: q3\nAssistant: a3") == [
        ("q1", "a1"), ("q3", "a3")]


def test_turn_cleaning_drops_admissions_trims_openings_and_drops_caption_talk():
    turns = [("q1", "I cannot see it, alas."),
             ("q2", "Per the legend, the LESION is in the liver."),
             ("q3", "The nodule, as the legend says is small."),
             ("q4", "The legend calls it benign."),
             ("q5", "A round opacity.")]
    assert clean_turns(turns, CLEANING) == [("q2", "The lesion is in the liver."), ("q3", "The nodule is small."),
                                            ("q5", "A round opacity.")]


def test_domain_flags_follow_llava_med():
    assert llava_med_domain("CT") == {"chest_xray": False, "mri": False, "histology": False, "gross": False,
                                      "ct_scan": True}
    assert not any(llava_med_domain("ultrasound").values())


def test_cleaning_lists_are_told_apart_by_what_clean_conv_does_with_them(checkout):
    assert reference_text.llava_med_cleaning_lists(checkout) == CLEANING


def test_checkout_files_are_parsed_never_run(checkout):
    source = (checkout / reference_text.FEW_SHOT).read_text()
    with pytest.raises(RuntimeError, match="parsed, never run"):
        exec(compile(source, "fs", "exec"), {})
    assert [e["fig_label"] for e in reference_text.llava_med_fewshot(checkout)] == ["Figure 1", "Figure 2"]


def test_llava_med_preset_sends_the_checkouts_prompt_and_writes_its_records(pairs, checkout, tmp_path,  # noqa: F811
                                                                            monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "EMPTY")
    with FakeOpenAI(fail_first=0) as server:
        options = InstructOptions(base_url=server.base_url, preset="llava_med", llava_med_repo=str(checkout),
                                  limit=3, max_retries=1, timeout=5.0, backoff_base=0.01)
        summary = generate_instructions(pairs, tmp_path / "out", options, progress=False)
        request = server.requests[0]["messages"]
    assert request[0] == {"role": "system", "content": SYSTEM}
    assert len(request) == 1 + 2 * 2 + 1
    assert request[1]["content"] == ("Figure Caption:\nFigure 1: Placeholder legend one.\n\nFigure Context:\n"
                                     "\t- Placeholder mention one.\n\t- Placeholder mention two.")
    assert request[2]["content"] == ("User: What kind of picture is this?\n\nAssistant: A placeholder radiograph.\n\n"
                                     "User: Anything unusual?\n\nAssistant: A placeholder shadow.")
    assert request[-1]["content"].startswith("Figure Caption:\nFigure ")
    assert "\n\nFigure Context:\n\t- " in request[-1]["content"]
    records = json.loads((tmp_path / "out" / "instruct.json").read_text())
    assert summary.accepted == len(records) == 3
    record = records[0]
    assert record["pair_id"] == record["id"] and set(record["domain"]) == {"chest_xray", "mri", "histology", "gross",
                                                                           "ct_scan"}
    first = record["conversations"][0]["value"]
    assert first.startswith("<image>\n") or first.endswith("\n<image>")
    assert [t["from"] for t in record["conversations"]] == ["human", "gpt", "human", "gpt"]


def test_the_checkout_may_come_from_the_environment(checkout, monkeypatch):
    monkeypatch.setenv(reference_text.ENV, str(checkout))
    system, fewshot = get_preset("llava_med").prompt(InstructOptions(preset="llava_med"))
    assert system == SYSTEM and [e["caption"] for e in fewshot] == ["Placeholder legend one.",
                                                                    "Placeholder legend two."]


def test_cli_reads_the_checkout_given_with_llava_med_repo(pairs, checkout, tmp_path):  # noqa: F811
    assert main(["ingest", "instruct", "--pairs", str(pairs), "--out", str(tmp_path / "dry"), "--preset", "llava_med",
                 "--llava-med-repo", str(checkout), "--limit", "1", "--dry-run"]) == 0
    prompt = json.loads((tmp_path / "dry" / "prompts.jsonl").read_text().splitlines()[0])
    assert prompt["messages"][0]["content"] == SYSTEM


def test_cli_without_a_checkout_says_how_to_get_one_in_one_line(pairs, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.delenv(reference_text.ENV, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "EMPTY")
    assert main(["ingest", "instruct", "--pairs", str(pairs), "--out", str(tmp_path / "out"),
                 "--preset", "llava_med"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "git clone https://github.com/microsoft/LLaVA-Med" in err and "--llava-med-repo" in err
    assert not (tmp_path / "out" / "cache.jsonl").exists()


def test_a_checkout_without_the_instruct_files_names_the_missing_file(tmp_path):
    main_branch = make_checkout(tmp_path / "main", branch="main")
    with pytest.raises(reference_text.ReferenceTextError,
                       match=r"instruct_postprocess\.py not found.*checkout v1\.0\.0"):
        get_preset("llava_med").prompt(InstructOptions(preset="llava_med", llava_med_repo=str(main_branch)))


def test_a_file_without_the_variable_names_it(checkout):
    path = checkout / reference_text.FEW_SHOT
    path.write_text(path.read_text().replace("fs = ", "examples = "))
    with pytest.raises(reference_text.ReferenceTextError, match=r"instruct_few_shot_examples\.py: no fs found"):
        reference_text.llava_med_fewshot(checkout)
