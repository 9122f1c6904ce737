"""The ``medvlm`` command: help, a stage from YAML, chat on a DICOM, clear errors."""

from __future__ import annotations

import subprocess
import sys

import yaml

from medvlm.cli import main
from medvlm.sample_images import sample_path


def test_help_lists_every_command(capsys):
    try:
        main(["--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    for command in ("train", "chat", "demo", "ingest"):
        assert command in out


def _write_stage(tmp_path, colour_set, **extra):
    data, images = colour_set
    stage = {"name": "cli", "model": {"preset": "tiny"}, "trainable": "projector+llm",
             "data": [{"path": str(data), "images": str(images)}], "output_dir": str(tmp_path / "out"),
             "max_steps": 4, "batch_size": 4, "lr": 1e-3, "log_steps": 1, **extra}
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump(stage))
    return path


def test_train_then_chat_about_a_dicom(tmp_path, colour_set, capsys):
    path = _write_stage(tmp_path, colour_set)
    assert main(["train", str(path), "--set", "max_steps=3"]) == 0
    out = capsys.readouterr().out
    checkpoint = tmp_path / "out" / "checkpoint"
    assert f"checkpoint: {checkpoint}" in out
    assert main(["chat", "--model", str(checkpoint), "--image", str(sample_path("CT_small.dcm", "pydicom")),
                 "--max-new-tokens", "5", "What is shown?"]) == 0
    answer = capsys.readouterr().out.strip()
    assert isinstance(answer, str)


def test_unknown_key_is_a_one_line_error(tmp_path, colour_set, capsys):
    path = _write_stage(tmp_path, colour_set, learning_rate=0.1)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'learning_rate'" in err and err.count("\n") == 1


def _run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "medvlm.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "MEDVLM_NO_PROGRESS": "1"})


def _losses(out):
    import json

    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_deepspeed_zero2_and_zero3_match_single_process(tmp_path, colour_set):
    """ZeRO-2/3 on CPU (gloo, one process) through the same trainer give the plain run's loss curve."""
    curves = {}
    for name, extra in (("plain", {}), ("zero2", {"deepspeed": "zero2"}), ("zero3", {"deepspeed": "zero3"})):
        run = tmp_path / name
        run.mkdir()
        path = _write_stage(run, colour_set, **extra)
        proc = _run_cli("train", str(path))
        assert proc.returncode == 0, proc.stderr[-3000:]
        curves[name] = _losses(run / "out")
        from transformers import LlavaForConditionalGeneration

        LlavaForConditionalGeneration.from_pretrained(run / "out" / "checkpoint")  # consolidated, loads plainly
    assert len(curves["plain"]) == 4
    for name in ("zero2", "zero3"):
        assert all(abs(a - b) < 1e-3 for a, b in zip(curves["plain"], curves[name])), (name, curves)


# ------------------------------------------------------------------------------------ user errors: one line, a code each
def _score_files(tmp_path, answer_lines):
    import json

    gt = [{"id": "q1", "image": "a.jpg", "answer_type": "CLOSED",
           "conversations": [{"from": "human", "value": "<image>\nNormal?"}, {"from": "gpt", "value": "yes"}]}]
    (tmp_path / "test.json").write_text(json.dumps(gt))
    (tmp_path / "answers.jsonl").write_text("".join(line + "\n" for line in answer_lines))
    return ["eval", "score", "--pred", str(tmp_path / "answers.jsonl"), "--gt", str(tmp_path / "test.json")]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("medvlm: error: ") and "Traceback" not in err, err
    return err


def test_bad_answer_line_names_file_and_line(tmp_path, capsys):
    from medvlm.cli.errors import BAD_INPUT

    argv = _score_files(tmp_path, ['{"question_id": "q0", "text": "no"}', '{"question_id": "q1", "text": "ye'])
    assert main(argv) == BAD_INPUT
    assert f"{tmp_path / 'answers.jsonl'}:2: not valid JSON" in _one_error_line(capsys)


def test_unmatched_ids_are_a_score_input_error(tmp_path, capsys):
    from medvlm.cli.errors import BAD_INPUT

    assert main(_score_files(tmp_path, ['{"question_id": "q9", "text": "yes"}'])) == BAD_INPUT
    err = _one_error_line(capsys)
    assert "missing predictions for ['q1']" in err and "unknown ids ['q9']" in err


def test_wrong_split_is_a_usage_error(tmp_path, capsys):
    from downstream.synthetic import write_vqa_rad_original
    from medvlm.cli.errors import USAGE
    from tests.test_downstream import _items

    write_vqa_rad_original(tmp_path / "rad", _items())
    assert main(["eval", "--model", str(tmp_path / "none"), "--dataset", "vqa-rad", "--root", str(tmp_path / "rad"),
                 "--split", "validation"]) == USAGE
    assert "VQA-RAD has splits train and test" in _one_error_line(capsys)


def test_a_refused_run_is_a_run_failure(tmp_path, capsys, monkeypatch):
    from medvlm.cli.errors import RUN_FAILED

    monkeypatch.delenv("MEDVLM_TEST_KEY", raising=False)
    assert main(["ingest", "instruct", "--pairs", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--api-key-env", "MEDVLM_TEST_KEY"]) == RUN_FAILED
    assert "set MEDVLM_TEST_KEY" in _one_error_line(capsys)


def test_unwritable_output_folder_is_a_filesystem_error(tmp_path, capsys, monkeypatch):
    from medvlm.cli.errors import FILESYSTEM

    monkeypatch.setenv("MEDVLM_TEST_KEY", "k")
    (tmp_path / "a_file").write_text("")
    argv = ["ingest", "instruct", "--pairs", str(tmp_path), "--api-key-env", "MEDVLM_TEST_KEY", "--out"]
    assert main(argv + [str(tmp_path / "a_file" / "out")]) == FILESYSTEM       # a file where a folder must go
    assert f"cannot access {tmp_path / 'a_file' / 'out'}" in _one_error_line(capsys)


def test_read_only_output_folder_is_a_filesystem_error(tmp_path, capsys, monkeypatch):
    import errno
    from pathlib import Path

    from medvlm.cli.errors import FILESYSTEM

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setenv("MEDVLM_TEST_KEY", "k")
    monkeypatch.setattr(Path, "mkdir", read_only)   # tests run as root, where chmod cannot make a folder read-only
    assert main(["ingest", "instruct", "--pairs", str(tmp_path), "--api-key-env", "MEDVLM_TEST_KEY",
                 "--out", str(tmp_path / "out")]) == FILESYSTEM
    err = _one_error_line(capsys)
    assert "Read-only file system" in err and "choose an output folder you can write to" in err


def test_debug_adds_the_traceback(tmp_path, capsys):
    argv = _score_files(tmp_path, ['{"question_id": "q1", "text": "ye'])
    main(argv + ["--debug"])
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("medvlm: error: ")


def test_an_unexpected_error_asks_for_the_debug_traceback(monkeypatch, capsys):
    from medvlm.cli import evaluate
    from medvlm.cli.errors import BUG

    def broken(args):
        raise TypeError("internal mistake")

    monkeypatch.setattr(evaluate, "run_score", broken)
    assert main(["eval", "score", "--pred", "p", "--gt", "g"]) == BUG
    assert "rerun with --debug" in _one_error_line(capsys)


def test_exit_codes_are_distinct_and_documented():
    from pathlib import Path

    from medvlm.cli import errors

    codes = [errors.OK, errors.BUG, errors.USAGE, errors.INTERRUPTED, errors.BAD_INPUT, errors.FILESYSTEM,
             errors.RUN_FAILED, errors.CTRL_C]
    assert len(set(codes)) == len(codes) == len(errors.EXIT_CODES)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for code in codes:
        assert f"| {code} |" in readme


# ------------------------------------------------------------------------------------ help
def _help(capsys, *argv) -> str:
    import pytest

    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_defaults(capsys):
    pmc = _help(capsys, "ingest", "pmc")
    assert "parser processes (default: 1)" in pmc and "(default: 20)" in pmc and "(default: 4000)" in pmc
    instruct = _help(capsys, "ingest", "instruct")
    assert "seconds per request (default: 120.0)" in instruct and "(default: 6)" in instruct


def test_eval_score_help_is_its_own(capsys):
    text = _help(capsys, "eval", "score")
    assert "--pred" in text and "--gt" in text
    assert "--model" not in text and "--batch-size" not in text and "--pairs" not in text


def test_printed_paths_have_no_double_slash(tmp_path, monkeypatch, capsys):
    from pmc_ingest import pairs

    class Report:
        shards = ["x"]
        pairs_kept = 1

        def summary(self):
            return "1 article"

    monkeypatch.setattr(pairs, "ingest_pmc", lambda inputs, out, options: Report())
    assert main(["ingest", "pmc", str(tmp_path), "--out", f"{tmp_path}/pairs/"]) == 0
    out = capsys.readouterr().out
    assert "//" not in out and f"{tmp_path / 'pairs' / 'pairs-*.parquet'}" in out


def test_finetune_with_max_steps_does_not_claim_nine_epochs(tmp_path, monkeypatch, capsys):
    from tests.test_protocols import _fake_finetune

    root, seen = _fake_finetune(tmp_path, monkeypatch)
    assert main(["finetune", "--dataset", "vqa-rad", "--root", str(root), "--model", "m",
                 "--out", str(tmp_path / "ft"), "--set", "max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert seen["config"].max_steps == 3
    assert "3 steps (max_steps overrides epochs)" in out and "9 epochs" not in out


def test_a_command_group_without_its_step_prints_its_own_help(capsys):
    from medvlm.cli.errors import USAGE

    assert main(["ingest"]) == USAGE
    out = capsys.readouterr().out
    assert out.startswith("usage: medvlm ingest") and "instruct" in out and "curriculum" not in out


def test_the_core_imports_nothing_above_it():
    """medvlm/*.py is what every stage shares: the CLI, ingest, curricula and downstream build on it, never the reverse."""
    import ast
    from pathlib import Path

    def above(name: str) -> bool:
        return name.split(".")[0] in ("downstream", "curricula", "pmc_ingest") or name.split(".")[:2] == ["medvlm", "cli"]

    offenders = []
    for path in sorted((Path(__file__).parents[1] / "medvlm").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.name}: {n}" for n in names if above(n)]
    assert offenders == []


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    from medvlm.cli import evaluate
    from medvlm.cli.errors import CTRL_C

    def pressed(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "run_score", pressed)
    assert main(["eval", "score", "--pred", "p", "--gt", "g"]) == CTRL_C
    err = capsys.readouterr().err
    assert err.startswith("medvlm: interrupted (Ctrl+C)") and err.count("\n") == 1 and "Traceback" not in err
