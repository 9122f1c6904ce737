"""Where a model runs (medvlm/device.py) and data-parallel evaluation, on CPU.

The GPU branches of the rule are checked with the machine's capabilities monkeypatched (CI has no GPU);
the data-parallel evaluation runs for real: 2 processes on gloo against 1 process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medvlm import device as dev

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu_machine(monkeypatch):
    """A machine with two CUDA GPUs that have bf16, no MPS and no flash_attn (until a test says so)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(dev, "flash_attn_installed", lambda: False)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield monkeypatch
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def test_without_an_accelerator_models_run_on_the_cpu_in_fp32_with_sdpa(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    assert dev.choose_placement().as_dict() == {"device": "cpu", "dtype": "float32", "attn_implementation": "sdpa"}


def test_a_gpu_with_bf16_runs_bf16_with_tf32_matmuls_on_this_ranks_gpu(gpu_machine):
    gpu_machine.setenv("LOCAL_RANK", "1")
    torch.backends.cuda.matmul.allow_tf32 = False
    placement = dev.choose_placement()
    assert placement.as_dict() == {"device": "cuda:1", "dtype": "bfloat16", "attn_implementation": "sdpa"}
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_an_older_gpu_runs_fp16(gpu_machine):
    gpu_machine.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert dev.choose_placement().dtype == torch.float16


def test_flash_attention_2_when_flash_attn_is_installed_and_on_cuda_only(gpu_machine):
    gpu_machine.setattr(dev, "flash_attn_installed", lambda: True)
    assert dev.choose_placement().attn_implementation == "flash_attention_2"
    assert dev.choose_placement("cpu").attn_implementation == "sdpa"   # --device cpu overrides the GPU


def test_apple_mps_runs_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert dev.choose_placement().as_dict() == {"device": "mps", "dtype": "float16", "attn_implementation": "sdpa"}


def test_a_device_this_machine_lacks_is_a_one_line_error(monkeypatch, gpu_machine):
    with pytest.raises(dev.DeviceError, match=r"--device cuda:3: this machine has 2 GPU\(s\)"):
        dev.choose_placement("cuda:3")
    gpu_machine.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(dev.DeviceError, match="no CUDA GPU is visible.*use --device cpu"):
        dev.choose_placement("cuda")
    with pytest.raises(dev.DeviceError, match="not a device name"):
        dev.choose_placement("gpu0")


def test_load_for_inference_places_the_model_and_describe_reads_it_back():
    bundle = dev.load_for_inference({"preset": "tiny"}, device="cpu")
    assert not bundle.model.training
    assert dev.describe(bundle.model) == {"device": "cpu", "dtype": "float32", "attn_implementation": "sdpa"}


# ------------------------------------------------------------------------------------ evaluation
EVAL_SCRIPT = """
import json, os, sys
from pathlib import Path
import downstream.evaluate as ev
from downstream.datasets import load_vqa
from medvlm.device import load_for_inference

answered = ev._predict
def counting(bundle, records, **kw):
    # one file per rank: the ranks' stdout lines can interleave in the launcher's pipe
    count = Path(sys.argv[2] + ".answered-rank" + os.environ.get("RANK", "0"))
    count.write_text(str(len(records)))
    return answered(bundle, records, **kw)
ev._predict = counting
root, out, mode = sys.argv[1:4]
records, _ = load_vqa("vqa-rad", root, "test")
result = ev.evaluate_model(load_for_inference({"preset": "tiny"}, device="cpu"), records, out, batch_size=3,
                           max_new_tokens=4, closed_mode=mode, progress=False)
Path(out + ".result-rank" + os.environ.get("RANK", "0")).write_text(json.dumps(result["suites"]["strict"]["closed_accuracy"]))
"""


def _vqa_set(root: Path) -> Path:
    """A VQA-RAD layout with 5 test images, 3 questions each (closed and open)."""
    from PIL import Image

    from downstream.synthetic import VQAItem, write_vqa_rad_original

    items = []
    for i in range(5):
        image = Image.new("RGB", (40 + 7 * i, 40), (40 * i, 200 - 30 * i, 90))
        items += [VQAItem(image, f"img{i}", "Is this a CT scan?", "yes" if i % 2 else "no", "CLOSED", "test"),
                  VQAItem(image, f"img{i}", "What organ is shown?", "lung", "OPEN", "test"),
                  VQAItem(image, f"img{i}", "Is there a fracture?", "no", "CLOSED", "test")]
    return write_vqa_rad_original(root, items)


def _run(launcher: list[str], script: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MEDVLM_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, *launcher, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow   # three interpreter starts
@pytest.mark.parametrize("mode", ["generate", "likelihood"])
def test_two_processes_answer_their_share_of_images_and_rank_0_scores_the_same_as_one(tmp_path, mode):
    root = tmp_path / "vqa"
    _vqa_set(root)
    script = tmp_path / "evaluate.py"
    script.write_text(EVAL_SCRIPT)
    one = _run([], script, root, tmp_path / "one", mode)
    two = _run(["-m", "torch.distributed.run", "--nproc_per_node", "2"], script, root, tmp_path / "two", mode)

    assert [p.read_text() for p in tmp_path.glob("one.answered-rank*")] == ["15"]
    shares = sorted(int(p.read_text()) for p in tmp_path.glob("two.answered-rank*"))
    assert len(shares) == 2 and sum(shares) == 15 and all(n % 3 == 0 and n > 0 for n in shares)  # whole images
    assert (tmp_path / "one" / "answers.jsonl").read_text() == (tmp_path / "two" / "answers.jsonl").read_text()
    metrics = {n: json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two")}
    assert metrics["one"].pop("settings")["processes"] == 1 and metrics["two"].pop("settings")["processes"] == 2
    assert metrics["one"] == metrics["two"]
    results = [p.read_text() for p in tmp_path.glob("two.result-rank*")]
    assert len(results) == 2 and len(set(results)) == 1   # every rank returns rank 0's scores
    assert not list((tmp_path / "two").glob(".ranks-*"))   # the exchange folder is gone


def test_metrics_record_the_device_dtype_and_attention_that_produced_them(tmp_path):
    from downstream.datasets import load_vqa
    from downstream.evaluate import evaluate_model

    _vqa_set(tmp_path / "vqa")
    records, _ = load_vqa("vqa-rad", tmp_path / "vqa", "test")
    evaluate_model(dev.load_for_inference({"preset": "tiny"}, device="cpu"), records[:3], tmp_path / "out",
                   max_new_tokens=2, progress=False)
    settings = json.loads((tmp_path / "out" / "metrics.json").read_text())["settings"]
    assert {k: settings[k] for k in ("device", "dtype", "attn_implementation", "processes")} == {
        "device": "cpu", "dtype": "float32", "attn_implementation": "sdpa", "processes": 1}


def test_a_failing_rank_stops_the_others_with_its_message(tmp_path):
    exchange = dev.FileExchange(tmp_path, "t", rank=0, world_size=2, poll=0.01)
    dev.FileExchange(tmp_path, "t", rank=1, world_size=2).fail(RuntimeError("CUDA out of memory"))
    with pytest.raises(RuntimeError, match="rank-1 failed: RuntimeError: CUDA out of memory"):
        exchange.gather({"q1": "yes"})


def test_chat_and_eval_take_device_and_a_missing_gpu_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from medvlm.cli.app import main
    from medvlm.model import build_tiny, save_folder

    save_folder(build_tiny(), tmp_path / "model")
    root = tmp_path / "vqa"
    _vqa_set(root)
    image = next((root / "VQA_RAD Image Folder").iterdir())
    assert main(["chat", "Is it red?", "--model", str(tmp_path / "model"), "--image", str(image), "--device", "cpu",
                 "--max-new-tokens", "2"]) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    capsys.readouterr()
    code = main(["eval", "--model", str(tmp_path / "model"), "--dataset", "vqa-rad", "--root", str(root),
                 "--out", str(tmp_path / "out"), "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--device cuda: no CUDA GPU is visible" in err


def test_a_judged_evaluation_records_what_answered(tmp_path, monkeypatch):
    from medvlm.cli.app import main
    from medvlm.model import build_tiny, save_folder
    from tests.test_judge import JudgeServer, _qa50

    save_folder(build_tiny(), tmp_path / "model")
    monkeypatch.setenv("OPENAI_API_KEY", "EMPTY")
    with JudgeServer() as server:
        assert main(["eval", "judge", "--questions", str(_qa50(tmp_path)), "--images", str(tmp_path), "--model",
                     str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--device", "cpu",
                     "--max-new-tokens", "2", "--base-url", server.base_url]) == 0
    answered = json.loads((tmp_path / "out" / "metrics.json").read_text())["answered_with"]
    assert answered == {"device": "cpu", "dtype": "float32", "attn_implementation": "sdpa", "protocol": "medvlm"}
