"""Instruction generation against a real local HTTP server through the real ``openai`` client."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from pmc_ingest.instruct import InstructError, InstructOptions, dry_run, generate_instructions, validate_reply
from pmc_ingest.pairs import IngestOptions, ingest_pmc
from pmc_ingest.synthetic import ArticleSpec, FigureSpec, write_package
from tests.openai_server import FakeOpenAI

CAPTIONS = {
    "ok1": "Axial CT of the chest shows a spiculated nodule in the left upper lobe of the lung.",
    "ok2": "T2-weighted MRI of the knee shows a tear of the medial meniscus.",
    "ok3": "Chest radiograph shows a right pleural effusion.",
    "ok4": "Ultrasound of the gallbladder shows several echogenic stones.",
    "rl": "[[429]] Axial CT of the abdomen shows a liver lesion.",
    "se": "[[500]] Coronal MRI of the brain shows a mass.",
    "to": "[[timeout]] Radiograph of the wrist shows a fracture.",
    "bad": "[[malformed]] Histology section of the colon with dysplasia.",
    "no": "[[refusal]] Endoscopy image of the stomach with an ulcer.",
    "q": "[[quote]] Dermoscopy of a pigmented skin lesion with an atypical network and irregular dots.",
    "br": "[[400]] Fundus photograph with drusen in the macula.",
}


@pytest.fixture
def pairs(tmp_path):
    figures = []
    for k, (name, caption) in enumerate(CAPTIONS.items(), 1):
        image = Image.new("RGB", (96, 96), (k * 20 % 255, 80, 160))
        image.putpixel((k, k), (255, 255, 255))
        figures.append(FigureSpec(f"F{k}", f"Figure {k}", f"<p>{caption}</p>", f"img_{name}", image))
    body = "".join(f'<p>The findings are shown (<xref ref-type="fig" rid="F{k}">Figure {k}</xref>).</p>'
                   for k in range(1, len(CAPTIONS) + 1))
    write_package(ArticleSpec("PMC2000001", body_xml=body, figures=figures), tmp_path / "oa")
    ingest_pmc([tmp_path / "oa"], tmp_path / "pairs", IngestOptions(), progress=False)
    return tmp_path / "pairs"


def _options(server, **kw) -> InstructOptions:
    settings = {"model": "gpt-4o", "base_url": server.base_url, "max_concurrency": 4, "max_retries": 3, "timeout": 1.0,
                "backoff_base": 0.01, "backoff_max": 0.2, **kw}
    return InstructOptions(**settings)


def test_end_to_end_retries_rejections_and_trainer_readable_output(pairs, tmp_path, monkeypatch):
    from medvlm.data import read_records

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with FakeOpenAI(fail_first=2) as server:
        summary = generate_instructions(pairs, tmp_path / "out", _options(server), progress=False)
        by_marker = {}
        for request in server.requests:
            user = request["messages"][-1]["content"]
            by_marker[user] = by_marker.get(user, 0) + 1
    assert summary.pairs == 11 and summary.sent == 10        # the 400 is not a sent reply
    assert summary.retries == 6                               # 429, 500, timeout: two failures each
    assert summary.failures == {"http_400": 1}
    assert dict(summary.rejected) == {"unparseable": 1, "refusal": 1, "quotes_caption": 1}
    assert summary.accepted == 7
    assert max(by_marker.values()) == 3 and sum(by_marker.values()) == 17   # 400 sent once, never retried
    assert summary.prompt_tokens > 0 and summary.completion_tokens == 400
    assert server.requests[0]["model"] == "gpt-4o"
    assert "Figure Context:" in server.requests[0]["messages"][-1]["content"]   # inline mentions switched on
    records = read_records(tmp_path / "out" / "instruct.json")
    assert len(records) == 7 and records[0]["conversations"][0]["value"].endswith("<image>")
    assert records[0]["image"].startswith("images/PMC2000001/")
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["accepted"] == 7


def test_the_trainer_trains_on_the_generated_data(pairs, tmp_path, monkeypatch):
    from medvlm.trainer import Trainer
    from tests.conftest import stage_config

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with FakeOpenAI() as server:
        generate_instructions(pairs, tmp_path / "out", _options(server), progress=False)
    config = stage_config(tmp_path / "out" / "instruct.json", pairs, tmp_path / "train", max_steps=2, batch_size=2)
    result = Trainer(config).run()
    assert result.global_step == 2 and result.metrics["data"]["skipped"] == {}


def test_killed_run_resends_exactly_the_missing_requests(pairs, tmp_path, monkeypatch):
    from pmc_ingest import instruct

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with FakeOpenAI(fail_first=0) as server:
        opts = _options(server, max_concurrency=1)
        original = instruct.ResponseCache.append
        calls = {"n": 0}

        def append_then_die(self, entry):
            original(self, entry)
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt("killed")

        monkeypatch.setattr(instruct.ResponseCache, "append", append_then_die)
        with pytest.raises(KeyboardInterrupt):
            generate_instructions(pairs, tmp_path / "out", opts, progress=False)
        monkeypatch.setattr(instruct.ResponseCache, "append", original)
        first = len(server.requests)
        summary = generate_instructions(pairs, tmp_path / "out", opts, progress=False)
        second = len(server.requests) - first
        assert first == 4 and summary.cached == 4 and second == 11 - 4
        sent_again = {r["messages"][-1]["content"] for r in server.requests[first:]}
        sent_before = {r["messages"][-1]["content"] for r in server.requests[:first]}
        assert not sent_again & sent_before
        third_before = len(server.requests)
        generate_instructions(pairs, tmp_path / "again", opts, progress=False)
    uninterrupted = json.loads((tmp_path / "again" / "instruct.json").read_text())
    assert json.loads((tmp_path / "out" / "instruct.json").read_text()) == uninterrupted
    assert third_before < len(server.requests)


def test_budget_stops_sending(pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with FakeOpenAI() as server:
        summary = generate_instructions(pairs, tmp_path / "out", _options(server, max_concurrency=1,
                                        max_tokens=100, max_tokens_total=3000), progress=False)
        sent = len(server.requests)
    assert summary.stopped_by_budget > 0 and sent < 11
    assert summary.prompt_tokens + summary.completion_tokens <= 3000


def test_usd_budget_needs_a_price(pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    with pytest.raises(InstructError, match="no price for model"):
        generate_instructions(pairs, tmp_path / "o", InstructOptions(model="my-local-model", budget_usd=1.0), progress=False)


def test_missing_api_key_is_a_clear_error(pairs, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(InstructError, match="set OPENAI_API_KEY"):
        generate_instructions(pairs, tmp_path / "o", InstructOptions(), progress=False)


def test_dry_run_writes_prompts_without_network(pairs, tmp_path):
    info = dry_run(pairs, tmp_path / "prompts.jsonl", InstructOptions(with_mentions=False, limit=3))
    lines = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert info["requests"] == len(lines) == 3 and info["estimated_prompt_tokens"] > 0
    assert "Figure Context" not in lines[0]["messages"][-1]["content"]


def test_validation_reasons():
    caption = "Axial CT of the chest shows a spiculated nodule in the left upper lobe of the lung"
    assert validate_reply("", caption)[1] == "empty"
    assert validate_reply("I'm sorry, I cannot do that.", caption)[1] == "refusal"
    assert validate_reply("User: only a question", caption)[1] == "unparseable"
    assert validate_reply(f"User: What?\nAssistant: {caption}.", caption)[1] == "quotes_caption"
    turns, reason = validate_reply("**User:** What is it?\n**Assistant:** A CT image.\nIt is axial.", caption)
    assert reason is None and turns == [("human", "What is it?"), ("gpt", "A CT image.\nIt is axial.")]


# ------------------------------------------------------------------------------------ what is permanent, what is retried
def _summary_file(out):
    return json.loads((out / "summary.json").read_text())


def test_a_wrong_url_is_not_cached_and_the_fixed_rerun_writes_records(pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with FakeOpenAI(always="404") as server:
        with pytest.raises(InstructError, match="no such URL or model"):
            generate_instructions(pairs, tmp_path / "out", _options(server), progress=False)
        assert len(server.requests) <= 4                       # stopped at once, not 11 × 404
        assert _summary_file(tmp_path / "out")["failures"]["http_404"] >= 1
        server.always = None                                   # the user fixes --base-url
        summary = generate_instructions(pairs, tmp_path / "out", _options(server), progress=False)
    assert summary.cached == 0 and summary.accepted == 7


def test_a_200_that_is_not_a_chat_completion_is_retried_by_the_next_run(pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with FakeOpenAI(always="shape") as server:
        with pytest.raises(InstructError, match="no usable instruction data"):
            generate_instructions(pairs, tmp_path / "out", _options(server), progress=False)
        assert _summary_file(tmp_path / "out")["failures"] == {"bad_response": 11}
        server.always = None
        summary = generate_instructions(pairs, tmp_path / "out", _options(server), progress=False)
    assert summary.cached == 0 and summary.accepted == 7


@pytest.mark.parametrize("always", ["500", "html"])
def test_a_broken_server_exits_non_zero_with_the_summary_written(pairs, tmp_path, monkeypatch, capsys, always):
    from medvlm.cli import main
    from medvlm.cli.errors import RUN_FAILED

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with FakeOpenAI(always=always) as server:
        code = main(["ingest", "instruct", "--pairs", str(pairs), "--out", str(tmp_path / "out"), "--base-url",
                     server.base_url, "--max-retries", "0", "--timeout", "1"])
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]                  # (progress bars share stderr)
    assert code == RUN_FAILED and "Traceback" not in err and last.startswith("medvlm: error: ")
    assert "no usable instruction data from 11 pairs" in last and str(tmp_path / "out" / "summary.json") in last
    saved = _summary_file(tmp_path / "out")
    assert saved["accepted"] == 0 and sum(saved["failures"].values()) == 11


def test_connection_refused_exits_non_zero_with_the_summary_written(pairs, tmp_path, monkeypatch):
    from tests.conftest import free_port

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    port = free_port()
    options = InstructOptions(base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, backoff_base=0.01, timeout=1.0)
    with pytest.raises(InstructError, match="APIConnectionError"):
        generate_instructions(pairs, tmp_path / "out", options, progress=False)
    assert _summary_file(tmp_path / "out")["failures"] == {"APIConnectionError": 11}


def test_a_dead_server_stops_the_run_after_consecutive_failures(pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with FakeOpenAI(always="500") as server:
        with pytest.raises(InstructError, match="3 requests in a row failed"):
            generate_instructions(pairs, tmp_path / "out", _options(server, max_concurrency=1, max_retries=0,
                                                                    max_consecutive_failures=3), progress=False)
        assert len(server.requests) == 3
    assert _summary_file(tmp_path / "out")["not_attempted"] == 8


def test_a_cache_line_cut_by_a_kill_does_not_eat_the_next_entry(pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    cache = tmp_path / "out" / "cache.jsonl"
    with FakeOpenAI(fail_first=0) as server:
        generate_instructions(pairs, tmp_path / "out", _options(server, limit=3), progress=False)
        lines = cache.read_text().splitlines(keepends=True)
        cache.write_text("".join(lines[:-1]) + lines[-1][:40])      # killed in the middle of the last line
        resumed = generate_instructions(pairs, tmp_path / "out", _options(server, limit=3), progress=False)
        assert resumed.corrupt_cache_lines == 1 and resumed.cached == 2 and resumed.sent == 1
        before = len(server.requests)
        again = generate_instructions(pairs, tmp_path / "out", _options(server, limit=3), progress=False)
        assert len(server.requests) == before                   # the re-sent entry survived its cut neighbour
    assert again.cached == 3 and again.accepted == resumed.accepted == 3


def test_concurrency_does_not_shrink_what_a_budget_buys(pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    sent = {}
    with FakeOpenAI(fail_first=0) as server:
        for concurrency in (1, 16):
            opts = _options(server, max_concurrency=concurrency, max_tokens=1000, budget_usd=0.06)
            sent[concurrency] = generate_instructions(pairs, tmp_path / f"c{concurrency}", opts, progress=False).sent
    assert 1 < sent[1] < 11 and sent[16] == sent[1]


def test_a_resumed_run_reports_tokens_and_cost_on_the_same_basis(pairs, tmp_path, monkeypatch):
    from pmc_ingest.chat_client import load_price

    price = load_price("gpt-4o", None, required=True)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with FakeOpenAI(fail_first=0) as server:
        first = generate_instructions(pairs, tmp_path / "out", _options(server, limit=4), progress=False)
        second = generate_instructions(pairs, tmp_path / "out", _options(server), progress=False)

    def usd(prompt, completion):
        return round((prompt * price["input"] + completion * price["output"]) / 1e6, 6)

    assert second.cached == 4 and second.completion_tokens == 40 * 6      # this run: the 6 other OK replies
    assert second.cost_usd == usd(second.prompt_tokens, second.completion_tokens)
    assert second.total_completion_tokens == first.completion_tokens + second.completion_tokens
    assert second.total_cost_usd == pytest.approx(usd(second.total_prompt_tokens, second.total_completion_tokens))


def test_dry_run_estimates_dollars(pairs, tmp_path, capsys):
    from medvlm.cli import main

    info = dry_run(pairs, tmp_path / "prompts.jsonl", InstructOptions(model="gpt-4o", max_tokens=100))
    assert info["estimated_prompt_usd"] == round(info["estimated_prompt_tokens"] * 2.5 / 1e6, 4)
    assert info["max_total_usd"] == round((info["estimated_prompt_tokens"] * 2.5 + 11 * 100 * 10.0) / 1e6, 4)
    assert main(["ingest", "instruct", "--pairs", str(pairs), "--out", str(tmp_path / "d"), "--dry-run"]) == 0
    assert "(about $" in capsys.readouterr().out
    assert dry_run(pairs, tmp_path / "p2.jsonl", InstructOptions(model="my-local-model"))["max_total_usd"] is None


def test_an_empty_reply_without_usage_cached_by_older_versions_is_sent_again(pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    cache = tmp_path / "out" / "cache.jsonl"
    with FakeOpenAI(fail_first=0) as server:
        generate_instructions(pairs, tmp_path / "out", _options(server, limit=1), progress=False)
        entry = json.loads(cache.read_text())
        cache.write_text(json.dumps({**entry, "text": "", "usage": None}) + "\n")   # what a wrong-shaped 200 left
        summary = generate_instructions(pairs, tmp_path / "out", _options(server, limit=1), progress=False)
    assert summary.cached == 0 and summary.sent == 1 and summary.accepted == 1


def test_modality_filter_matches_any_case_and_refuses_unknown_tags(pairs):
    from pmc_ingest.instruct import select_pairs
    from pmc_ingest.pairs import load_pairs

    tagged = [r["modality"] for r in load_pairs(pairs) if r["modality"]]
    assert tagged, "the fixture's captions must carry modality tags"
    wanted = tagged[0]
    chosen = select_pairs(pairs, InstructOptions(modalities=[wanted.lower()]))
    assert chosen and {r["modality"] for r in chosen} == {wanted}
    with pytest.raises(ValueError, match="unknown modality tag"):
        select_pairs(pairs, InstructOptions(modalities=["ctt"]))
