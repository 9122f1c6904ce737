"""GPT-judged chat evaluation against a real local OpenAI-compatible HTTP server."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from downstream.judge import (JUDGE_SYSTEM, LLAVA_BENCH, ChatQuestion, Rubric, judge_messages, judge_options,
                              load_rubric, parse_scores, read_questions, run_judge, summarize)
from pmc_ingest.reference_text import ENV
from tests.llava_med_checkout import JUDGE_SYSTEM as PLACEHOLDER_SYSTEM
from tests.llava_med_checkout import RUBRIC as PLACEHOLDER_RUBRIC
from tests.llava_med_checkout import make_checkout
from tests.openai_server import FakeOpenAI

DOMAIN = {"chest_xray": False, "mri": False, "histology": False, "gross": False, "ct_scan": False}


class JudgeServer(FakeOpenAI):
    """Scores the reference 8 and the model's answer by its length: 2 for 'short', 6 otherwise; a question
    containing [[garbled]] gets a reply without scores."""

    def handle(self, handler, body):
        user = body["messages"][-1]["content"]
        with self.lock:
            self.requests.append(body)
        answer = re.search(r"\[Assistant 2\]\n(.*?)\n\n\[End of Assistant 2\]", user, re.S).group(1)
        text = "8 2\nThe second answer is too short." if answer == "short" else "8 6\nBoth are relevant."
        if "[[garbled]]" in user:
            text = "Assistant 1 is better."
        self._send(handler, 200, {
            "id": "j", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}})


def _qa50(tmp_path, n=4):
    """A llava_med_eval_qa50_qa.jsonl-style file: CXR conversation questions and MRI descriptions."""
    lines = []
    for i in range(n):
        Image.new("RGB", (40, 30), (i * 40, 90, 30)).save(tmp_path / f"img{i}.png")
        domain = {**DOMAIN, ("chest_xray" if i % 2 == 0 else "mri"): True}
        lines.append({"question_id": i, "image": f"img{i}.png", "domain": domain,
                      "type": "conversation" if i % 2 == 0 else "detailed_description",
                      "text": f"What is shown in image {i}?", "fig_caption": f"Caption {i}.", "fig_label": f"Figure {i}",
                      "in_text_mention": [f"Mention {i}a.", {"tokens": f"Mention {i}b."}],
                      "gpt4_answer": f"A detailed reference answer {i}."})
    path = tmp_path / "qa50.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_judge_prompt_has_label_caption_mention_bullets_and_llava_benchs_rule_by_default(tmp_path):
    item = read_questions(_qa50(tmp_path))[0]
    messages = judge_messages(item, "ref", "ans")
    user = messages[1]["content"]
    assert user.startswith("[Context]\nFigure Caption:\nFigure 0: Caption 0.\n\nFigure Context:\n\t- Mention 0a.\n\t- Mention 0b.")
    assert "[Assistant 1]\nref\n\n[End of Assistant 1]\n\n[Assistant 2]\nans\n\n[End of Assistant 2]" in user
    assert user.endswith(f"[System]\n{LLAVA_BENCH.instruction}\n\n")
    assert "represented with a few sentences describing the image" in LLAVA_BENCH.instruction   # LLaVA-Bench's wording
    assert messages[0] == {"role": "system", "content": JUDGE_SYSTEM}
    assert (item.domain, item.type) == ("chest_xray", "conversation")


@pytest.mark.parametrize("branch", ["v1.0.0", "main"])
def test_llava_med_rubric_and_system_message_are_read_from_the_users_checkout(tmp_path, branch):
    rubric = load_rubric("llava_med", llava_med_repo=make_checkout(tmp_path / "LLaVA-Med", branch))
    assert rubric == Rubric("llava_med", PLACEHOLDER_SYSTEM, PLACEHOLDER_RUBRIC)
    messages = judge_messages(ChatQuestion("a", "q", None, "conversation", None, "c", "", [], "r"), "r", "x", rubric)
    assert messages[0]["content"] == PLACEHOLDER_SYSTEM
    assert messages[1]["content"].endswith(f"[System]\n{PLACEHOLDER_RUBRIC}\n\n")


@pytest.mark.parametrize("reply, scores", [("8 6\nwhy", (8.0, 6.0)), ("7.5, 9\n", (7.5, 9.0)),
                                           ("Assistant 1: 8", None), ("", None), ("8 6 7", None)])
def test_scores_come_from_the_first_line_only(reply, scores):
    assert parse_scores(reply) == scores


def test_relative_score_is_the_mean_of_per_question_ratios_per_group():
    rows = [{"type": "conversation", "domain": "mri", "scores": (8.0, 4.0)},
            {"type": "conversation", "domain": "ct_scan", "scores": (5.0, 5.0)},
            {"type": "detailed_description", "domain": "mri", "scores": (10.0, 2.0)},
            {"type": "detailed_description", "domain": "mri", "scores": None}]
    summary = summarize(rows)
    overall = summary["overall"]
    assert overall["relative_score"] == pytest.approx(100 * (0.5 + 1.0 + 0.2) / 3, abs=0.01)
    assert overall["ratio_of_means"] == pytest.approx(100 * 11 / 23, abs=0.01)
    assert (overall["questions"], overall["scored"]) == (4, 3)
    assert summary["domain:mri"]["relative_score"] == pytest.approx(35.0)
    assert summary["type:conversation"]["relative_score"] == pytest.approx(75.0)
    low, high = overall["relative_score_ci"]
    assert low <= overall["relative_score"] <= high


def test_model_answers_are_judged_and_a_rerun_sends_nothing(tmp_path, monkeypatch):
    from downstream.judge import answer_questions
    from downstream.protocols import EvalSettings
    from medvlm.model import build_tiny

    monkeypatch.setenv("OPENAI_API_KEY", "EMPTY")
    questions = read_questions(_qa50(tmp_path))
    answers = answer_questions(build_tiny(), questions, tmp_path, tmp_path / "out",
                               EvalSettings(max_new_tokens=4), progress=False)
    assert set(answers) == {"0", "1", "2", "3"}
    answers["1"] = "short"
    with JudgeServer() as server:
        options = judge_options(base_url=server.base_url, max_retries=1, timeout=5.0)
        result = run_judge(questions, answers, tmp_path / "out", options, progress=False)
        sent = len(server.requests)
        again = run_judge(questions, answers, tmp_path / "out", options, progress=False)
        assert len(server.requests) == sent == 4
    assert result == again
    summary = result["summary"]
    assert summary["overall"]["relative_score"] == pytest.approx(100 * (6 / 8 * 3 + 2 / 8) / 4)
    assert summary["domain:mri"]["relative_score"] == pytest.approx(100 * (2 / 8 + 6 / 8) / 2)
    assert set(summary) == {"overall", "type:conversation", "type:detailed_description", "domain:chest_xray",
                            "domain:mri"}
    rows = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert rows[1]["judge_reply"].startswith("8 2") and rows[1]["scores"] == [8.0, 2.0]
    assert "| overall | 4 | 4 |" in (tmp_path / "out" / "report.md").read_text()


def test_unscored_replies_are_counted_not_guessed(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "EMPTY")
    questions = [ChatQuestion("a", "[[garbled]] q", None, "conversation", "mri", "c", "", [], "ref"),
                 ChatQuestion("b", "q", None, "conversation", "mri", "c", "", [], "ref")]
    with JudgeServer() as server:
        result = run_judge(questions, {"a": "x", "b": "y"}, tmp_path, judge_options(base_url=server.base_url),
                           progress=False)
    assert (result["summary"]["overall"]["scored"], result["summary"]["overall"]["relative_score"]) == (1, 75.0)


def test_cli_judges_an_answer_file_and_names_a_missing_reference(tmp_path, monkeypatch, capsys):
    from medvlm.cli import main

    monkeypatch.setenv("OPENAI_API_KEY", "EMPTY")
    questions = _qa50(tmp_path, n=2)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i, "text": "An answer."}) + "\n" for i in range(2)))
    with JudgeServer() as server:
        assert main(["eval", "judge", "--questions", str(questions), "--answers", str(answers),
                     "--out", str(tmp_path / "j"), "--base-url", server.base_url]) == 0
        assert "| overall | 2 | 2 | 8.0 | 6.0 | 75.0" in capsys.readouterr().out
        rows = [json.loads(line) for line in questions.read_text().splitlines()]
        del rows[1]["gpt4_answer"]
        questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert main(["eval", "judge", "--questions", str(questions), "--answers", str(answers),
                     "--out", str(tmp_path / "k"), "--base-url", server.base_url]) == 4
    err = capsys.readouterr().err
    assert "question 1: no reference answer" in err and len(err.strip().splitlines()) == 1


def _judge_cli(tmp_path, server, out, *extra):
    from medvlm.cli import main

    questions = _qa50(tmp_path, n=2)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i, "text": "An answer."}) + "\n" for i in range(2)))
    return main(["eval", "judge", "--questions", str(questions), "--answers", str(answers),
                 "--out", str(tmp_path / out), "--base-url", server.base_url, *extra])


def test_cli_judges_with_llava_meds_rubric_from_llava_med_repo_or_with_a_rubric_file(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "EMPTY")
    checkout = make_checkout(tmp_path / "LLaVA-Med")
    (tmp_path / "rubric.txt").write_text("My own rubric: score both 1-10 on the first line.\n")
    with JudgeServer() as server:
        assert _judge_cli(tmp_path, server, "med", "--rubric", "llava_med", "--llava-med-repo", str(checkout)) == 0
        assert _judge_cli(tmp_path, server, "own", "--rubric-file", str(tmp_path / "rubric.txt")) == 0
        sent = [r["messages"] for r in server.requests]
    assert [m[1]["content"].endswith(f"[System]\n{PLACEHOLDER_RUBRIC}\n\n") for m in sent] == [True, True, False, False]
    assert sent[2][1]["content"].endswith("[System]\nMy own rubric: score both 1-10 on the first line.\n\n")
    assert json.loads((tmp_path / "med" / "metrics.json").read_text())["rubric"] == "llava_med"
    assert json.loads((tmp_path / "own" / "metrics.json").read_text())["rubric"] == "file:rubric.txt"


def test_cli_llava_med_rubric_without_a_checkout_says_how_to_get_one_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "EMPTY")
    monkeypatch.delenv(ENV, raising=False)
    with JudgeServer() as server:
        assert _judge_cli(tmp_path, server, "j", "--rubric", "llava_med") == 2
        assert server.requests == []
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--rubric llava_med needs your own LLaVA-Med checkout" in err
    assert "git clone https://github.com/microsoft/LLaVA-Med" in err and "--llava-med-repo" in err


def test_a_judge_endpoint_that_refuses_fails_the_run_with_the_metrics_written(tmp_path, monkeypatch):
    from pmc_ingest.chat_client import ClientError

    monkeypatch.setenv("OPENAI_API_KEY", "EMPTY")
    questions = [ChatQuestion("a", "q", None, "conversation", "mri", "c", "", [], "ref")]
    with FakeOpenAI(always="404") as server, pytest.raises(ClientError, match="judging stopped"):
        run_judge(questions, {"a": "x"}, tmp_path, judge_options(base_url=server.base_url), progress=False)
    assert json.loads((tmp_path / "metrics.json").read_text())["unanswered_by_judge"] == 1
