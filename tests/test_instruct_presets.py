"""Instruction-generation presets: LLaVA-Med's prompt and post-processing recipe as ``--preset llava_med``."""

from __future__ import annotations

import json

from pmc_ingest.instruct import InstructOptions, generate_instructions
from pmc_ingest.instruct_presets import clean_turns, get_preset, llava_med_context, llava_med_domain, split_turns
from tests.openai_server import FakeOpenAI
from tests.test_instruct import pairs  # noqa: F401 - the shared PMC pairs fixture

RULES = json.loads((get_preset("llava_med").system_file.parent / "llava_med_cleaning.json").read_text())


def test_context_puts_the_figure_label_before_the_caption_and_bullets_mentions():
    assert llava_med_context("Figure 2", "Chest X-ray.", ["As seen in Fig. 2.", "Effusion (Fig. 2)."], True) == (
        "Figure Caption:\nFigure 2: Chest X-ray.\n\nFigure Context:\n\t- As seen in Fig. 2.\n\t- Effusion (Fig. 2).")
    assert llava_med_context("Figure 2", "Chest X-ray.", ["m"], False) == "Figure Caption:\nFigure 2: Chest X-ray."


def test_reply_is_split_at_user_and_assistant():
    assert split_turns("Intro\nUser: q1\nAssistant: a1\n\nUser: q2 without answer\nUser: q3\nAssistant: a3") == [
        ("q1", "a1"), ("q3", "a3")]


def test_turn_cleaning_drops_admissions_trims_openings_and_drops_caption_talk():
    turns = [("q1", "I cannot see the image, sorry."),
             ("q2", "Based on the caption, the LESION is in the liver."),
             ("q3", "The nodule as mentioned in the caption is small."),
             ("q4", "The caption says it is benign."),
             ("q5", "A round opacity.")]
    assert clean_turns(turns, RULES) == [("q2", "The lesion is in the liver."), ("q3", "The nodule is small."),
                                         ("q5", "A round opacity.")]


def test_domain_flags_follow_llava_med():
    assert llava_med_domain("CT") == {"chest_xray": False, "mri": False, "histology": False, "gross": False,
                                      "ct_scan": True}
    assert not any(llava_med_domain("ultrasound").values())


def test_llava_med_preset_sends_llava_meds_prompt_and_writes_its_records(pairs, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("OPENAI_API_KEY", "EMPTY")
    with FakeOpenAI(fail_first=0) as server:
        options = InstructOptions(base_url=server.base_url, preset="llava_med", limit=3, max_retries=1,
                                  timeout=5.0, backoff_base=0.01)
        summary = generate_instructions(pairs, tmp_path / "out", options, progress=False)
        request = server.requests[0]["messages"]
    assert request[0]["content"].startswith("You are an AI assistant specialized in biomedical topics.")
    assert len(request) == 1 + 2 * 8 + 1 and request[2]["content"].startswith("User: Which side of the lung")
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
