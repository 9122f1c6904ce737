"""Static HTML reports (pairs, instruct, eval): their content, and that they render in headless Chromium
with every image decoded and every table present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from downstream.report import UNPARSED, confusion, ordered_rows, write_eval_report
from pmc_ingest.report_html import ReportError, write_instruct_report, write_pairs_report
from tests.browser import broken_images, image_count, start_chromium
from tests.ecosystem_data import write_eval, write_instruct_dir, write_pairs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from medvlm.model import build_tiny

    root = tmp_path_factory.mktemp("reports")
    pairs = write_pairs(root)
    return {"root": root, "pairs": pairs, "instruct": write_instruct_dir(pairs, root / "instruct"),
            "eval": write_eval(root, build_tiny())}


@pytest.fixture(scope="module")
def browser():
    driver = start_chromium()
    yield driver
    driver.quit()


def _open(browser, page: Path):
    browser.get(page.resolve().as_uri())
    return browser


# ------------------------------------------------------------------------------------ pairs
def test_pairs_page_shows_every_sampled_figure_with_caption_and_mentions(data):
    page = write_pairs_report(data["pairs"]).read_text()
    assert page.count('<div class="item ') == 3
    assert "Axial T2-weighted MRI of the brain" in page
    assert "The lesion is shown (Figure 1) next to the chest CT (Figure 2)." in page  # an inline mention
    assert "CC BY-NC" in page and '<table class="modalities">' in page


def test_pairs_page_renders_in_chromium_without_broken_images(data, browser):
    _open(browser, write_pairs_report(data["pairs"]))
    assert image_count(browser) == 3 + 1   # three thumbnails and the modality histogram
    assert broken_images(browser) == []
    for name in ("modalities", "licenses", "filtered"):
        assert browser.find_elements("css selector", f"table.{name} tbody tr"), name


def test_pairs_page_samples_a_large_table_down(data, tmp_path):
    page = write_pairs_report(data["pairs"], tmp_path / "two.html", sample=2).read_text()
    assert page.count('<div class="item ') == 2 and "(2 of 3, seed 0)" in page


def test_a_figure_path_leaving_the_pairs_folder_is_not_read(data, tmp_path):
    from pmc_ingest.report_html import _image_path

    assert _image_path(data["pairs"], "../../etc/passwd") is None
    assert _image_path(data["pairs"], "images/x.jpg") == (data["pairs"] / "images/x.jpg").resolve()


# ------------------------------------------------------------------------------------ instruct
def test_instruct_page_puts_each_conversation_next_to_its_caption(data):
    page = write_instruct_report(data["instruct"], data["pairs"]).read_text()
    records = json.loads((data["instruct"] / "instruct.json").read_text())
    assert page.count('<div class="item ') == len(records) == 3
    assert "<b>Caption:</b> Axial T2-weighted MRI of the brain" in page
    assert records[0]["conversations"][1]["value"] in page


def test_instruct_page_renders_in_chromium_without_broken_images(data, browser):
    _open(browser, write_instruct_report(data["instruct"], data["pairs"]))
    assert image_count(browser) == 3 + 1
    assert broken_images(browser) == []
    assert browser.find_elements("css selector", "table.rounds tbody tr")
    assert len(browser.find_elements("css selector", ".conversation .turn")) >= 6


def test_instruct_page_needs_instruct_json(data, tmp_path):
    with pytest.raises(ReportError, match="no instruct.json"):
        write_instruct_report(tmp_path, data["pairs"])


# ------------------------------------------------------------------------------------ eval
def test_wrong_answers_come_first(data, tmp_path):
    rows = [json.loads(line) for line in (data["eval"] / "answers.jsonl").read_text().splitlines()]
    rows[0]["prediction"] = rows[0]["gt"]                              # right
    rows[1]["prediction"] = "no, there is none"                         # right (closed, gt "no")
    ordered = ordered_rows(rows)
    verdicts = [correct for _, correct in ordered]
    assert verdicts == sorted(verdicts) and verdicts.count(True) == 2
    assert {r["id"] for r, correct in ordered if correct} == {rows[0]["id"], rows[1]["id"]}


def test_confusion_matrix_counts_closed_answers_by_the_strict_rule():
    rows = [{"answer_type": "closed", "gt": "yes", "prediction": "Yes, it is."},
            {"answer_type": "closed", "gt": "yes", "prediction": "no"},
            {"answer_type": "closed", "gt": "No", "prediction": "no."},
            {"answer_type": "closed", "gt": "no", "prediction": "maybe"},
            {"answer_type": "open", "gt": "CT", "prediction": "CT"}]
    labels, columns, matrix = confusion(rows)
    assert labels == ["no", "yes"] and columns == ["no", "yes", UNPARSED]
    assert matrix == [[1, 0, 1], [1, 1, 0]]


def test_eval_page_renders_in_chromium_with_accuracy_and_confusion_tables(data, browser):
    _open(browser, write_eval_report(data["eval"]))
    questions = len((data["eval"] / "answers.jsonl").read_text().splitlines())
    assert image_count(browser) == questions
    assert broken_images(browser) == []
    suites = json.loads((data["eval"] / "metrics.json").read_text())["suites"]
    assert len(browser.find_elements("css selector", "table.accuracy tbody tr")) == len(suites)   # one row per suite
    assert len(browser.find_elements("css selector", "table.confusion tbody tr")) == 2  # yes / no
    assert browser.find_elements("css selector", "table.groups")


def test_an_unreadable_image_is_shown_as_unavailable_not_broken(data, tmp_path, browser):
    run = tmp_path / "run"
    run.mkdir()
    rows = [json.loads(line) for line in (data["eval"] / "answers.jsonl").read_text().splitlines()][:2]
    rows[0]["image"] = str(tmp_path / "gone.jpg")
    (run / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "metrics.json").write_text((data["eval"] / "metrics.json").read_text())
    page = write_eval_report(run)
    assert "image unavailable" in page.read_text()
    _open(browser, page)
    assert image_count(browser) == 1 and broken_images(browser) == []


def test_eval_page_needs_an_eval_folder(tmp_path):
    from downstream.report import ReportInputError

    with pytest.raises(ReportInputError, match="no answers.jsonl"):
        write_eval_report(tmp_path)


def test_report_commands_print_where_each_page_went(data, tmp_path, capsys):
    from medvlm.cli import main

    assert main(["report", "pairs", str(data["pairs"]), "--out", str(tmp_path / "p.html")]) == 0
    assert main(["report", "instruct", str(data["instruct"]), "--pairs", str(data["pairs"]),
                 "--out", str(tmp_path / "i.html")]) == 0
    assert main(["report", "eval", str(data["eval"]), "--out", str(tmp_path / "e.html")]) == 0
    out = capsys.readouterr().out
    for name in ("p.html", "i.html", "e.html"):
        assert f"report: {tmp_path / name}" in out and (tmp_path / name).is_file()


def test_report_eval_on_a_folder_without_answers_is_a_one_line_input_error(tmp_path, capsys):
    from medvlm.cli import main

    assert main(["report", "eval", str(tmp_path)]) == 4
    assert "no answers.jsonl" in capsys.readouterr().err
