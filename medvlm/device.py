"""Where a model runs, and in what precision: one rule for every command that runs a model for inference.

``choose_placement`` is that rule (eval, chat, the likelihood closed mode, judged evals, curriculum eval
stages):

- **device**: ``--device`` when given (``cpu``, ``cuda``, ``cuda:1``, ``mps``); otherwise this process's
  GPU (``cuda:$LOCAL_RANK`` under a launcher, so every rank of a data-parallel evaluation has its own),
  then Apple's ``mps``, then the CPU;
- **dtype**: bf16 on GPUs that support it, fp16 on older GPUs and ``mps``, fp32 on the CPU (half precision
  on the CPU is slow and not what anybody evaluates with);
- **attention**: FlashAttention-2 when ``flash_attn`` is installed and the model runs in half precision on
  CUDA, PyTorch's SDPA otherwise;
- **tf32** matmuls on CUDA (``torch.backends.cuda.matmul.allow_tf32``), as LLaVA's training scripts set.

``load_for_inference`` loads a model source with those choices and moves it there; ``describe`` reads
back from a model what actually ran (device, dtype, attention implementation), which every eval writes
into its metrics JSON.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch


class DeviceError(ValueError):
    """A ``--device`` this machine does not have; the message says what to use instead."""


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    attn_implementation: str

    def as_dict(self) -> dict:
        return {"device": str(self.device), "dtype": dtype_name(self.dtype),
                "attn_implementation": self.attn_implementation}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose_device(requested: str | None = None) -> torch.device:
    """``requested`` checked against this machine, or the accelerator when present, else the CPU."""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError as exc:
            raise DeviceError(f"--device {requested!r}: not a device name ({exc}); use cpu, cuda, cuda:N or mps") from exc
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise DeviceError(f"--device {requested}: no CUDA GPU is visible to this process "
                                  "(torch.cuda.is_available() is False); use --device cpu or leave --device out")
            index = device.index if device.index is not None else _local_rank() % torch.cuda.device_count()
            if index >= torch.cuda.device_count():
                raise DeviceError(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s), "
                                  f"numbered 0..{torch.cuda.device_count() - 1}")
            return torch.device("cuda", index)
        if device.type == "mps" and not _mps_available():
            raise DeviceError(f"--device {requested}: Apple's MPS backend is not available here; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", _local_rank() % torch.cuda.device_count())
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def choose_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def choose_attention(device: torch.device, dtype: torch.dtype) -> str:
    """FlashAttention-2 needs CUDA, half precision and the ``flash_attn`` package; SDPA runs anywhere."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and flash_attn_installed():
        return "flash_attention_2"
    return "sdpa"


def choose_placement(device: str | None = None) -> Placement:
    """The one rule: device, then its dtype, then the attention kernel that fits both."""
    chosen = choose_device(device)
    dtype = choose_dtype(chosen)
    if chosen.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Placement(chosen, dtype, choose_attention(chosen, dtype))


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def place(bundle, placement: Placement):
    """Move an already-built bundle's model to ``placement`` (dtype, device, attention kernel); eval mode."""
    model, base = bundle.model, bundle.base_model
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(placement.attn_implementation)
    bundle.model = model.to(device=placement.device, dtype=placement.dtype).eval()
    return bundle


def load_for_inference(source: dict | str | os.PathLike, device: str | None = None, trust_remote_code: bool = False):
    """A model source (``{checkpoint: DIR}``, ``{compose: …}``, ``{preset: tiny}`` or a folder path) loaded
    in the chosen dtype with the chosen attention kernel, on the chosen device, in eval mode."""
    from .model import load_model

    placement = choose_placement(device)
    if not isinstance(source, dict):
        source = {"checkpoint": str(source)}
    bundle = load_model(source, dtype=placement.dtype, trust_remote_code=trust_remote_code,
                        attn_implementation=placement.attn_implementation)
    return place(bundle, placement)


def describe(model) -> dict:
    """What actually runs: the device and dtype of the weights and the attention kernel in the config."""
    from .model import unwrap_peft

    base = unwrap_peft(model)
    param = next(p for p in base.parameters() if p.is_floating_point())
    config = base.config
    text = getattr(config, "text_config", config)
    attention = getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None) or "eager"
    return {"device": str(param.device), "dtype": dtype_name(param.dtype), "attn_implementation": attention}


# ------------------------------------------------------------------------------------ data-parallel evaluation
def data_parallel() -> tuple[int, int]:
    """``(rank, world_size)`` of this process under ``torchrun``/``accelerate launch``; ``(0, 1)`` otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def shared_token() -> str:
    """A fresh token, the same on every rank: rank 0's, broadcast once when every rank starts an evaluation
    (the only collective of a data-parallel evaluation; the ranks arrive within a model load of each other)."""
    import uuid

    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(_local_rank() % torch.cuda.device_count())
        dist.init_process_group(backend=backend)
    box = [uuid.uuid4().hex]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


class FileExchange:
    """Rank 0 gathers every rank's part through files in a shared folder instead of a collective.

    Why files: a collective (``gather_object``, a barrier) makes a rank that finished its share wait inside
    NCCL/gloo while the slowest rank still generates, and NCCL's timeout (minutes) is shorter than a large
    evaluation; a rank waiting on a file waits as long as it must. The folder is the output folder, which
    rank 0 writes anyway and every rank already reads (checkpoints); a launcher ends all ranks when one
    dies, and a rank whose share fails writes ``rank-N.error`` so the others stop with its message.

    Protocol: every rank writes ``rank-N.json`` atomically; rank 0 reads them all, writes ``result.json``;
    every other rank reads it and deletes its part; rank 0 then removes the folder."""

    def __init__(self, folder: str | os.PathLike, token: str, rank: int, world_size: int, poll: float = 0.2):
        from pathlib import Path

        self.folder = Path(folder) / f".ranks-{token}"
        self.rank, self.world_size, self.poll = rank, world_size, poll
        self.folder.mkdir(parents=True, exist_ok=True)

    def _write(self, name: str, data) -> None:
        import json

        from .fileio import atomic_write_text

        atomic_write_text(self.folder / name, data if name.endswith(".error") else json.dumps(data), fsync=False)

    def fail(self, exc: BaseException) -> None:
        self._write(f"rank-{self.rank}.error", f"{type(exc).__name__}: {exc}")

    def _wait(self, names: list[str]) -> None:
        import time

        while True:
            errors = sorted(self.folder.glob("rank-*.error"))
            if errors:
                raise RuntimeError(f"data-parallel evaluation: {errors[0].stem} failed: {errors[0].read_text()}")
            if all((self.folder / name).is_file() for name in names):
                return
            time.sleep(self.poll)

    def gather(self, part) -> list | None:
        """Every rank's ``part`` (JSON-able) on rank 0, in rank order; ``None`` on the other ranks."""
        import json

        self._write(f"rank-{self.rank}.json", part)
        if self.rank != 0:
            return None
        names = [f"rank-{r}.json" for r in range(self.world_size)]
        self._wait(names)
        return [json.loads((self.folder / name).read_text()) for name in names]

    def publish(self, result):
        """Rank 0: hand ``result`` to every rank and clean up once all have read it; others: wait for it."""
        import json
        import shutil
        import time

        if self.rank == 0:
            self._write("result.json", result)
            while any((self.folder / f"rank-{r}.json").exists() for r in range(1, self.world_size)):
                time.sleep(self.poll)   # each rank deletes its part once it has the result: seconds
            shutil.rmtree(self.folder, ignore_errors=True)
            return result
        self._wait(["result.json"])
        result = json.loads((self.folder / "result.json").read_text())
        (self.folder / f"rank-{self.rank}.json").unlink()
        return result
