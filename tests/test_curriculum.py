"""The curriculum runner on the tiny preset: end to end, re-runs, sweeps sharing prefixes, staleness, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from curricula.plan import build_plan, load_curriculum
from curricula.runner import run_curriculum
from downstream.synthetic import VQAItem, write_vqa_rad_original
from tests.conftest import COLOURS, make_colour_set

CURRICULA = Path(__file__).resolve().parents[1] / "curricula"


def _vqa_set(root: Path) -> Path:
    from PIL import Image

    items = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        for split in ("train", "test"):
            image = Image.new("RGB", (40 + i, 40), rgb)
            stem = f"{name}_{split}"
            items += [VQAItem(image, stem, "Is it red?", "yes" if name == "red" else "no", "CLOSED", split),
                      VQAItem(image, stem, "What colour is it?", name, "OPEN", split)]
    return write_vqa_rad_original(root, items)


def _write(tmp_path: Path, sweep: dict | None = None, **stage_overrides) -> Path:
    data, images = make_colour_set(tmp_path / "data", n=12)
    _vqa_set(tmp_path / "vqa")
    common = {"batch_size": 4, "log_steps": 1, "seed": 3}
    stages = [
        {"name": "align", "kind": "train", "trainable": "projector", "template": "plain", "lr": 1e-3, "max_steps": 2,
         "data": [{"path": "data/conversations.json", "images": "data/images"}]},
        {"name": "instruct", "kind": "train", "trainable": "projector+llm", "lr": 1e-3, "max_steps": 4, "save_steps": 1,
         "data": [{"path": "data/conversations.json", "images": "data/images"}]},
        {"name": "finetune", "kind": "finetune", "datasets": [{"name": "vqa-rad", "root": "vqa"}], "epochs": 1,
         "lr": 1e-3},
        {"name": "eval", "kind": "eval", "split": "test", "baseline": True, "max_new_tokens": 4},
    ]
    for stage in stages:
        stage.update(stage_overrides.get(stage["name"], {}))
    path = tmp_path / "curriculum.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "model": {"preset": "tiny"}, "defaults": common, "stages": stages,
                                    **({"sweep": sweep} if sweep else {})}))
    return path


def _folders(run: Path) -> list[str]:
    return sorted(p.name.rsplit("-", 1)[0] for p in (run / "stages").iterdir())


def test_runs_the_chain_end_to_end_and_a_rerun_does_nothing(tmp_path, capsys):
    path = _write(tmp_path)
    run = tmp_path / "run"
    summary = run_curriculum(path, run)
    assert set(summary["before"]) >= {"closed_accuracy", "open_recall"} and set(summary["after"]) >= {"closed_accuracy"}
    manifest = json.loads((run / "manifest.json").read_text())
    assert {s["status"] for s in manifest["stages"].values()} == {"done"}
    assert manifest["packages"]["torch"] and "inputs" in next(iter(manifest["stages"].values()))
    assert _folders(run) == ["align", "eval-vqa-rad", "finetune-vqa-rad", "instruct"]
    for name in ("align", "instruct", "finetune-vqa-rad"):
        folder = next((run / "stages").glob(f"{name}-*"))
        for file in ("checkpoint/config.json", "log.jsonl", "metrics.json", "loss.png", "stage.json"):
            assert (folder / file).is_file(), (folder, file)
    eval_folder = next((run / "stages").glob("eval-vqa-rad-*"))
    assert (eval_folder / "answers.jsonl").is_file() and (eval_folder / "baseline" / "metrics.json").is_file()
    capsys.readouterr()
    before = {p: p.stat().st_mtime for p in (run / "stages").rglob("stage.json")}
    run_curriculum(path, run)
    assert capsys.readouterr().out.count("done, skipping") == 4
    assert before == {p: p.stat().st_mtime for p in (run / "stages").rglob("stage.json")}


def test_projector_only_stage_feeds_its_projector_to_the_next(tmp_path):
    import torch
    from safetensors.torch import load_file

    from medvlm.model import load_checkpoint

    path = _write(tmp_path, instruct={"trainable": "lora", "max_steps": 1})
    run = tmp_path / "run"
    run_curriculum(path, run, only=None)
    align = next((run / "stages").glob("align-*"))
    projector = load_file(str(align / "checkpoint" / "mm_projector.safetensors"))
    instruct_start = load_checkpoint(align / "checkpoint").model.model.multi_modal_projector.state_dict()
    assert all(torch.equal(projector[k], instruct_start[k]) for k in projector)


def test_sweep_variants_share_their_common_prefix(tmp_path):
    path = _write(tmp_path, sweep={"finetune.epochs": [1, 2]})
    plan = build_plan(load_curriculum(path), tmp_path)
    assert len(plan.variants) == 2 and len(plan.nodes) == 6   # align, instruct once; finetune+eval twice
    run = tmp_path / "run"
    summary = run_curriculum(path, run)
    assert _folders(run) == ["align", "eval-vqa-rad", "eval-vqa-rad", "finetune-vqa-rad", "finetune-vqa-rad", "instruct"]
    assert set(summary["variants"]) == {"finetune.epochs=1", "finetune.epochs=2"}
    from curricula.report import write_report

    table = write_report(run)
    assert "finetune.epochs=1" in table and (run / "ablation.png").is_file()


def test_changing_a_stage_makes_it_and_later_stages_stale(tmp_path):
    path = _write(tmp_path)
    run = tmp_path / "run"
    run_curriculum(path, run)
    first = set((run / "stages").iterdir())
    path = _write(tmp_path, instruct={"lr": 5e-4})
    run_curriculum(path, run)
    manifest = json.loads((run / "manifest.json").read_text())
    stale = sorted(v["name"] for v in manifest["stages"].values() if v["status"] == "stale")
    assert stale == ["eval[vqa-rad]", "finetune[vqa-rad]", "instruct"]
    now_done = {v["name"]: name for name, v in manifest["stages"].items() if v["status"] == "done"}
    assert run / "stages" / now_done["align"] in first          # reused, not retrained
    assert run / "stages" / now_done["instruct"] not in first   # retrained under a new key


def test_resume_after_a_crash_in_a_stage_gives_the_uninterrupted_metrics(tmp_path, monkeypatch):
    from medvlm import trainer as trainer_module

    path = _write(tmp_path)
    clean = run_curriculum(path, tmp_path / "clean")

    original = trainer_module.Trainer._micro_step
    calls = {"n": 0}

    def crash_in_instruct(self, batch):
        if self.config.name == "instruct":
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("simulated crash")
        return original(self, batch)

    monkeypatch.setattr(trainer_module.Trainer, "_micro_step", crash_in_instruct)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_curriculum(path, tmp_path / "crashed")
    manifest = json.loads((tmp_path / "crashed" / "manifest.json").read_text())
    instruct = next(v for v in manifest["stages"].values() if v["name"] == "instruct")
    assert instruct["status"] == "failed" and instruct["error"] == "RuntimeError: simulated crash"
    from curricula.report import show_status

    status_line = next(line for line in show_status(tmp_path / "crashed").splitlines() if "instruct" in line)
    assert "failed" in status_line and "simulated crash" in status_line
    monkeypatch.setattr(trainer_module.Trainer, "_micro_step", original)
    resumed = run_curriculum(path, tmp_path / "crashed")
    instruct_log = next((tmp_path / "crashed" / "stages").glob("instruct-*")) / "log.jsonl"
    assert '"step": 2' in instruct_log.read_text()
    assert resumed["after"] == clean["after"] and resumed["before"] == clean["before"]


@pytest.mark.parametrize("name", ["llava_med.yaml", "llava_med_from_llava.yaml", "llava_med_ablation.yaml", "demo.yaml",
                                  "demo_ablation.yaml"])
def test_show_plans_every_shipped_curriculum_without_weights(name, monkeypatch, capsys):
    """Without their data (not in the repository) the plan is still printed, then the missing files fail it."""
    import transformers

    from medvlm.cli import main

    def refuse(*_, **__):
        raise AssertionError("curriculum show must not load weights")

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    assert main(["curriculum", "show", str(CURRICULA / name)]) == 2
    out, err = capsys.readouterr()
    data = yaml.safe_load((CURRICULA / name).read_text())
    for stage in data["stages"]:
        assert stage["name"] in out
    first = data["stages"][0]["data"][0]
    assert "missing input(s)" in err and str(first["path"] if isinstance(first, dict) else first) in err


def test_show_fails_naming_a_missing_data_file_and_passes_when_all_exist(tmp_path, capsys):
    from medvlm.cli import main

    path = _write(tmp_path)
    assert main(["curriculum", "show", str(path)]) == 0
    (tmp_path / "data" / "conversations.json").unlink()
    assert main(["curriculum", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "align: " in err and str(tmp_path / "data" / "conversations.json") in err


def test_run_refuses_missing_inputs_before_training_anything(tmp_path):
    from curricula.plan import MissingInputs

    path = _write(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "vqa")
    with pytest.raises(MissingInputs, match="finetune\\[vqa-rad\\]: .*vqa"):
        run_curriculum(path, tmp_path / "run")
    assert not (tmp_path / "run" / "stages").exists()


def test_invalid_trainable_and_template_are_refused_at_load_with_did_you_mean(tmp_path):
    from medvlm.config import ConfigError

    with pytest.raises(ConfigError, match="stage instruct: 'trainable: projecter'.*did you mean 'projector'"):
        build_plan(load_curriculum(_write(tmp_path, instruct={"trainable": "projecter"})), tmp_path)
    with pytest.raises(ConfigError, match="stage align: 'template: plian'.*did you mean 'plain'"):
        build_plan(load_curriculum(_write(tmp_path, align={"template": "plian"})), tmp_path)
    with pytest.raises(ConfigError, match="kind 'evaluate'.*did you mean 'eval'"):
        build_plan(load_curriculum(_write(tmp_path, eval={"kind": "evaluate"})), tmp_path)


def test_unknown_stage_key_fails_before_running(tmp_path):
    from medvlm.config import ConfigError

    path = _write(tmp_path, instruct={"epoch": 1})
    with pytest.raises(ConfigError, match="did you mean"):
        run_curriculum(path, tmp_path / "run")


def _stop_in(stage: str, at_call: int, monkeypatch) -> None:
    """Deliver SIGTERM's effect (the trainer's stop flag) during ``stage``'s ``at_call``-th micro-step."""
    import signal

    from medvlm import trainer as trainer_module

    original = trainer_module.Trainer._micro_step
    calls = {"n": 0}

    def stopping(self, batch):
        if self.config.name == stage:
            calls["n"] += 1
            if calls["n"] == at_call:
                self.state.stop_signal = signal.SIGTERM
        return original(self, batch)

    monkeypatch.setattr(trainer_module.Trainer, "_micro_step", stopping)


def test_a_preempted_stage_is_not_done_the_run_exits_3_and_a_rerun_resumes_it(tmp_path, monkeypatch, capsys):
    from medvlm.cli import main
    from medvlm import trainer as trainer_module

    path = _write(tmp_path)
    run = tmp_path / "run"
    original = trainer_module.Trainer._micro_step
    _stop_in("instruct", 2, monkeypatch)
    assert main(["curriculum", "run", str(path), "--run-dir", str(run)]) == 3
    assert "interrupted" in capsys.readouterr().out
    instruct = next((run / "stages").glob("instruct-*"))
    assert not (instruct / "checkpoint").exists() and list((instruct / "resume").glob("checkpoint-*/COMPLETE"))
    manifest = json.loads((run / "manifest.json").read_text())
    assert {v["name"]: v["status"] for v in manifest["stages"].values()}["instruct"] == "interrupted"
    assert not list((run / "stages").glob("finetune-*"))        # the next stage never started
    monkeypatch.setattr(trainer_module.Trainer, "_micro_step", original)
    assert main(["curriculum", "run", str(path), "--run-dir", str(run), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    logged = [r["step"] for r in map(json.loads, (instruct / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert logged == [1, 2, 3, 4]
    manifest = json.loads((run / "manifest.json").read_text())
    assert {s["status"] for s in manifest["stages"].values()} == {"done"}


def test_resume_without_a_run_to_resume_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume: .* holds no curriculum run"):
        run_curriculum(_write(tmp_path), tmp_path / "nothing-here", resume=True)


def test_a_second_run_on_the_same_directory_is_refused(tmp_path):
    from medvlm.fileio import FolderInUse, FolderLock

    path = _write(tmp_path)
    with FolderLock(tmp_path / "run", "curriculum run"):
        with pytest.raises(FolderInUse, match=rf"{tmp_path / 'run'} is in use by another curriculum run \(pid \d+"):
            run_curriculum(path, tmp_path / "run", only="align")


def test_the_lock_of_a_crashed_run_is_taken_over_with_a_message(tmp_path, capsys):
    import subprocess
    import sys

    path = _write(tmp_path)
    run = tmp_path / "run"
    script = ("import os, sys\nfrom medvlm.fileio import FolderLock\n"
              f"FolderLock({str(run)!r}).__enter__()\nos._exit(9)  # dies holding the lock\n")
    subprocess.run([sys.executable, "-c", script], check=False, cwd=Path(__file__).resolve().parents[1])
    assert (run / ".lock.owner").is_file()
    run_curriculum(path, run, only="align")
    assert "ended without releasing it" in capsys.readouterr().out
    assert not (run / ".lock.owner").exists()


def test_a_data_set_change_in_any_file_under_its_root_makes_its_stages_stale(tmp_path):
    path = _write(tmp_path)
    before = {n.name: n.key for n in build_plan(load_curriculum(path), tmp_path).nodes}
    extra = next((tmp_path / "vqa").rglob("*.json")).parent / "notes.txt"
    extra.write_text("a question file in another format")
    after = {n.name: n.key for n in build_plan(load_curriculum(path), tmp_path).nodes}
    assert after["align"] == before["align"] and after["instruct"] == before["instruct"]
    assert after["finetune[vqa-rad]"] != before["finetune[vqa-rad]"]


def test_a_toy_stage_kind_is_one_registered_unit(tmp_path, registered):
    from curricula.kinds import KINDS, StageKind, register

    def run(runner, node):
        (runner.folder(node) / "note.txt").write_text(node.settings["text"])
        return {"characters": len(node.settings["text"])}

    registered(register, KINDS, StageKind("note", frozenset({"text"}), False, lambda stage, parent: [None],
                                          lambda stage, defaults: {"text": stage["text"]}, run))
    path = tmp_path / "curriculum.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "model": {"preset": "tiny"},
                                    "stages": [{"name": "hello", "kind": "note", "text": "hi"}]}))
    summary = run_curriculum(path, tmp_path / "run")
    folder = next((tmp_path / "run" / "stages").glob("hello-*"))
    assert (folder / "note.txt").read_text() == "hi"
    assert json.loads((folder / "stage.json").read_text())["metrics"] == {"characters": 2} and summary
    path.write_text(path.read_text().replace("text: hi", "txt: hi"))
    with pytest.raises(ValueError, match="txt"):                        # the kind's keys are what the planner checks
        build_plan(load_curriculum(path), tmp_path)
    with pytest.raises(ValueError, match="registered already"):
        register(StageKind("note", frozenset(), False, None, None, None))
