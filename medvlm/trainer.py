"""THE trainer: one loop for every stage (LLaVA stage 1/2, biomedical stages, downstream finetunes).

Features, and how a stage config (``medvlm.config.StageConfig``) switches them:

- **Devices**: single process on CPU or one GPU; multi-GPU / multi-node under ``accelerate launch``,
  ``torchrun`` or ``deepspeed``. ``deepspeed: zero2|zero3|PATH.json`` uses accelerate's DeepSpeed
  plugin (``medvlm/configs/zero{2,3}.json``; ``auto`` values are filled from the stage config).
- **Precision**: ``precision: auto`` is bf16 autocast on GPUs that have it, fp32 otherwise.
- **Trainable parts**: ``trainable: projector | projector+llm | lora (+vision)``; LoRA targets the language
  model only and trains the projector fully. ``init_projector`` loads a stage-1 projector first.
- **Optimisation**: AdamW, ``projector_lr`` for the projector (LLaVA's ``mm_projector_lr``), linear warmup
  (``warmup_ratio``) + cosine decay, ``grad_accum``, ``max_grad_norm`` clipping, ``epochs`` or ``max_steps``.
- **Frozen vision features** (``feature_cache``, on by default): each image's selected vision-tower features
  are computed once and reused every later step (``features.py``); exact, skipped when the tower trains.
- **Logits where the loss is** (``answer_logits_only``, on by default): the LM head and the cross-entropy
  run only at positions that predict a supervised token (``logits_to_keep``), not at every image and
  prompt token; the loss is the one transformers computes, exactly, without the [tokens × vocab] logits.
- **Data**: LLaVA conversation JSON/JSONL, labels on assistant turns only, length-grouped batches
  (``group_by_length``; ``auto`` groups when random batches would pad ≥ 10%), padding fraction logged
  per epoch, unusable records counted by reason and a ``max_skip_rate`` guard.
- **Checkpoints**: every ``save_steps`` optimizer steps and at each epoch end, atomically, keeping
  ``keep_last``; a new run with the same ``output_dir`` resumes from the latest complete one with the
  same data order (the batch order is a function of seed and epoch; mid-epoch batches are skipped).
  SIGTERM/SIGINT (Slurm preemption) write a checkpoint and exit cleanly.
- **Outputs**: ``checkpoint/`` (an HF folder that loads with plain transformers; LoRA merged;
  ``mm_projector.safetensors`` too when only the projector trained), ``log.jsonl``, ``metrics.json``,
  ``data_report.json``; a progress bar with loss and samples/s; TensorBoard with ``tensorboard: true``.

Read ``Trainer.setup`` then ``Trainer.train``: the parts are built in that order, nothing is hidden.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import ResumeCheckpoints, atomic_folder
from .config import ConfigError, StageConfig, to_dict
from .conversation import IGNORE_INDEX
from .data import Collator, ConversationDataset, LengthGroupedBatchSampler, choose_grouping
from .model import (PROJECTOR_FILE, LlavaBundle, apply_trainable, load_model, load_projector, parse_trainable,
                    save_folder, save_projector, trainable_summary)

logger = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class TrainResult:
    output_dir: Path
    checkpoint: Path
    global_step: int
    metrics: dict
    interrupted: bool = False


class Trainer:
    """Runs one stage; ``Trainer(config).run()`` is the whole job."""

    def __init__(self, config: StageConfig, bundle: LlavaBundle | None = None):
        self.config = config
        self.bundle = bundle
        self.output_dir = Path(config.output_dir)
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.config
        from accelerate.utils import set_seed

        # model → trainable parts → data → optimizer → scheduler → prepare → resume
        set_seed(cfg.seed)
        # A preset is initialised randomly: build it before a ZeRO-3 accelerator exists, so zero.Init
        # does not change its initialisation; real checkpoints load after, partitioned by zero.Init.
        if self.bundle is None and "preset" in cfg.model:
            self.bundle = load_model(cfg.model)
        self.accelerator = self._make_accelerator()
        self.is_main = self.accelerator.is_main_process
        self.rank = self.accelerator.process_index
        if cfg.tensorboard:
            self.accelerator.init_trackers(cfg.name)
        if self.bundle is None:
            self.bundle = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
        if "lora" in parse_trainable(cfg.trainable) and self._zero3():
            raise ConfigError("trainable: lora with deepspeed: zero3 is not supported (the adapters cannot be merged "
                              "into partitioned weights at export); use deepspeed: zero2 for LoRA stages")
        if cfg.init_projector:
            load_projector(self.bundle.model, cfg.init_projector)
        apply_trainable(self.bundle, cfg.trainable, to_dict(cfg.lora))
        if cfg.gradient_checkpointing:
            self.bundle.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.bundle.model.enable_input_require_grads()
        self.feature_cache = self._make_feature_cache()
        self.template = cfg.template or self.bundle.template
        self.bundle.template = self.template
        self.dataset = ConversationDataset(
            cfg.data, self.bundle, self.template, max_length=cfg.max_length, overlength=cfg.overlength,
            image_aspect_ratio=cfg.image_aspect_ratio, system=cfg.system, max_skip_rate=cfg.max_skip_rate,
        )
        self.dataset.feature_cache = self.feature_cache
        self.group_by_length = choose_grouping(cfg.group_by_length, self.dataset.lengths, cfg.batch_size, cfg.seed)
        self.sampler = LengthGroupedBatchSampler(self.dataset.lengths, cfg.batch_size, seed=cfg.seed,
                                                 group_by_length=self.group_by_length)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=cfg.num_workers,
            collate_fn=Collator(self.bundle.tokenizer.pad_token_id),
        )
        batches_per_process = math.ceil(len(loader) / self.accelerator.num_processes)
        self.steps_per_epoch = max(1, math.ceil(batches_per_process / cfg.grad_accum))
        self.total_steps = cfg.max_steps or max(1, math.ceil(self.steps_per_epoch * cfg.epochs))
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        optimizer = self._make_optimizer()
        from transformers import get_cosine_schedule_with_warmup

        # accelerate steps a prepared scheduler once per process per optimizer step.
        n = self.accelerator.num_processes
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * self.total_steps) * n,
            num_training_steps=self.total_steps * n,
        )
        self.model, self.optimizer, self.loader, self.scheduler = self.accelerator.prepare(
            self.bundle.model, optimizer, loader, scheduler
        )
        self.checkpoints = ResumeCheckpoints(self.output_dir, cfg.keep_last)
        self.state = {"global_step": 0, "epoch": 0, "batch_in_epoch": 0, "samples_seen": 0}
        resumed = self.checkpoints.load_latest(self.accelerator.load_state)
        if resumed:
            self._check_resume(resumed)
            self.state.update({k: resumed[k] for k in self.state})
            self._log(f"resumed from {resumed['path']} at step {self.state['global_step']}")

    def _zero3(self) -> bool:
        plugin = self.accelerator.state.deepspeed_plugin
        return plugin is not None and plugin.zero_stage == 3

    def _make_feature_cache(self):
        cfg = self.config
        if not cfg.feature_cache or "vision" in parse_trainable(cfg.trainable) or self._zero3():
            return None
        from .features import FeatureCache

        return FeatureCache(self.bundle.model, self.bundle.image_processor, cfg.image_aspect_ratio, cfg.feature_cache_dir)

    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin

        cfg = self.config
        precision = cfg.precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
        plugin = None
        kwargs = {}
        _check_deepspeed_consistency(bool(cfg.deepspeed))
        if cfg.deepspeed:
            from accelerate.utils import InitProcessGroupKwargs

            _ensure_distributed_env()
            # what `accelerate launch` would set; makes torchrun/deepspeed launches start DeepSpeed's comm
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            plugin = DeepSpeedPlugin(hf_ds_config=self._deepspeed_config(mixed),
                                     gradient_accumulation_steps=cfg.grad_accum)
            if not torch.cuda.is_available():
                kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        if cfg.tensorboard:
            kwargs.update(log_with="tensorboard", project_dir=str(self.output_dir))
        if plugin is None and not torch.cuda.is_available():
            kwargs["cpu"] = True  # under torchrun/accelerate launch without GPUs: gloo across CPU processes
        return Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mixed,
                           deepspeed_plugin=plugin, **kwargs)

    def _deepspeed_config(self, mixed: str) -> dict:
        cfg = self.config
        named = CONFIG_DIR / f"{cfg.deepspeed}.json"
        path = named if named.is_file() else Path(cfg.deepspeed)
        if not path.is_file():
            raise FileNotFoundError(f"deepspeed: {cfg.deepspeed!r} is neither zero2, zero3 nor a JSON file")
        ds = json.loads(path.read_text())
        world = int(os.environ.get("WORLD_SIZE", "1"))
        fills = {
            "train_micro_batch_size_per_gpu": cfg.batch_size,
            "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.max_grad_norm,
            "train_batch_size": cfg.batch_size * cfg.grad_accum * world,
        }
        for key, value in fills.items():
            if ds.get(key) == "auto":
                ds[key] = value
        for key, on in (("bf16", mixed == "bf16"), ("fp16", mixed == "fp16")):
            if isinstance(ds.get(key), dict) and ds[key].get("enabled") == "auto":
                ds[key]["enabled"] = on
        zero = ds.get("zero_optimization", {})
        hidden = self._hidden_size()
        for key, value in (("reduce_bucket_size", hidden * hidden),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                           ("stage3_param_persistence_threshold", 10 * hidden)):
            if zero.get(key) == "auto":
                zero[key] = value
        if not torch.cuda.is_available():
            ds.setdefault("zero_allow_untested_optimizer", True)
        return ds

    def _hidden_size(self) -> int:
        model = self.config.model
        if "preset" in model:
            return 128
        if self.bundle is not None:
            return int(self.bundle.config.text_config.hidden_size)
        return 4096

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        projector, decay, no_decay = [], [], []
        for name, param in self.bundle.model.named_parameters():
            if not param.requires_grad:
                continue
            if "multi_modal_projector" in name:
                projector.append(param)
            elif param.ndim < 2 or "norm" in name:
                no_decay.append(param)
            else:
                decay.append(param)
        if not (projector or decay or no_decay):
            raise ValueError(f"trainable={cfg.trainable!r} leaves no parameter to train")
        groups = [
            {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
            {"params": projector, "lr": cfg.projector_lr or cfg.lr, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.999), eps=1e-8)

    def _check_resume(self, state: dict) -> None:
        for key in ("total_steps", "seed", "batch_size"):
            saved, now = state.get(key), {"total_steps": self.total_steps, "seed": self.config.seed,
                                           "batch_size": self.config.batch_size}[key]
            if saved is not None and saved != now:
                logger.warning("resuming with %s=%s but the checkpoint was written with %s=%s; "
                               "the data order or schedule will differ from an uninterrupted run", key, now, key, saved)

    # ------------------------------------------------------------------------------------ train
    def run(self) -> TrainResult:
        final = self.output_dir / "checkpoint"
        if (final / "COMPLETE").is_file() and (self.output_dir / "metrics.json").is_file():
            metrics = json.loads((self.output_dir / "metrics.json").read_text())
            print(f"stage {self.config.name}: already finished; checkpoint at {final}")
            return TrainResult(self.output_dir, final, metrics.get("global_step", 0), metrics)
        self.setup()
        return self.train()

    def train(self) -> TrainResult:
        cfg, acc = self.config, self.accelerator
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            self._write_json("data_report.json", self.dataset.report.as_dict())
            self._write_json("stage_config.json", to_dict(cfg))
        counts = trainable_summary(self.model)
        self._log(f"stage {cfg.name}: {len(self.dataset)} examples, {self.total_steps} optimizer steps "
                  f"({self.num_epochs} epoch(s)), trainable {counts['trainable']:,} / {counts['total']:,} parameters, "
                  f"{acc.num_processes} process(es), precision {acc.mixed_precision}, template {self.template}, "
                  f"{'length-grouped' if self.group_by_length else 'random'} batches, "
                  f"feature cache {'on' if self.feature_cache else 'off'}")
        previous = self._install_signal_handlers()
        progress = self._progress()
        window = {"loss": 0.0, "micro": 0, "samples": 0, "tokens": 0, "time": time.perf_counter()}
        epoch_pad = {"pad": 0, "tokens": 0}
        skipped_images = 0
        interrupted = False
        start_time = time.perf_counter()
        samples_at_start = self.state["samples_seen"]
        self.model.train()
        try:
            while self.state["global_step"] < self.total_steps and not interrupted:
                epoch = self.state["epoch"]
                self.sampler.set_epoch(epoch)
                if hasattr(self.loader, "set_epoch"):
                    self.loader.set_epoch(epoch)
                loader = self.loader
                if self.state["batch_in_epoch"]:
                    loader = acc.skip_first_batches(self.loader, self.state["batch_in_epoch"])
                for batch in loader:
                    self.state["batch_in_epoch"] += 1
                    skipped_images += len(batch.get("skipped", []))
                    if batch.get("empty"):
                        continue
                    loss = self._micro_step(batch)
                    window["loss"] += loss
                    window["micro"] += 1
                    n_samples = int(batch["input_ids"].shape[0]) * acc.num_processes
                    window["samples"] += n_samples
                    window["tokens"] += int(batch["num_tokens"] - batch["num_pad_tokens"])
                    self.state["samples_seen"] += n_samples
                    epoch_pad["pad"] += int(batch["num_pad_tokens"])
                    epoch_pad["tokens"] += int(batch["num_tokens"])
                    if not acc.sync_gradients:
                        continue
                    self.state["global_step"] += 1
                    step = self.state["global_step"]
                    progress.update(1)
                    if step % cfg.log_steps == 0 or step == self.total_steps:
                        self._log_window(window, epoch, progress)
                    if cfg.save_steps and step % cfg.save_steps == 0 and step < self.total_steps:
                        self._save_resume()
                    if self._stop_signal is not None:
                        interrupted = True
                        break
                    if step >= self.total_steps:
                        break
                if interrupted:
                    break
                pad_fraction = epoch_pad["pad"] / max(1, epoch_pad["tokens"])
                self._append_log({"event": "epoch_end", "epoch": epoch, "step": self.state["global_step"],
                                  "padding_fraction": round(pad_fraction, 4), "skipped_images": skipped_images})
                epoch_pad = {"pad": 0, "tokens": 0}
                self.state["epoch"] += 1
                self.state["batch_in_epoch"] = 0
                if self.state["global_step"] < self.total_steps:
                    self._save_resume()
        finally:
            progress.close()
            self._restore_signal_handlers(previous)
        elapsed = time.perf_counter() - start_time
        if interrupted:
            path = self._save_resume()
            signame = signal.Signals(self._stop_signal).name
            self._log(f"received {signame}: saved {path}; resume with the same command (output_dir {self.output_dir})")
            return TrainResult(self.output_dir, path, self.state["global_step"], {}, interrupted=True)
        metrics = {
            "global_step": self.state["global_step"], "epochs": self.state["epoch"],
            "samples_seen": self.state["samples_seen"], "final_loss": self.last_loss,
            "train_seconds": round(elapsed, 3),
            "samples_per_second": round((self.state["samples_seen"] - samples_at_start) / max(elapsed, 1e-9), 3),
            "skipped_images": skipped_images, "data": self.dataset.report.as_dict(),
            "trainable_parameters": counts["trainable"],
        }
        checkpoint = self._export()
        if self.is_main:
            self._write_json("metrics.json", metrics)
        self._log(f"stage {cfg.name}: done, final loss {self.last_loss:.4f}; checkpoint at {checkpoint}")
        for tracker in acc.trackers:  # not end_training(): the process group must outlive this stage
            tracker.finish()
        _reset_accelerate_state()
        return TrainResult(self.output_dir, checkpoint, self.state["global_step"], metrics)

    last_loss: float = float("nan")

    def _micro_step(self, batch: dict) -> float:
        acc, cfg = self.accelerator, self.config
        with acc.accumulate(self.model):
            keep = answer_positions(batch["labels"]) if cfg.answer_logits_only else None
            head = {"labels": batch["labels"]} if keep is None else {"logits_to_keep": keep[0]}
            if batch.get("image_keys"):
                with acc.autocast():  # the same precision the model's own vision path would run in
                    outputs = self.model(inputs_embeds=self._cached_embeds(batch), attention_mask=batch["attention_mask"],
                                         **head)
            else:
                outputs = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     pixel_values=batch["pixel_values"], **head)
            # the causal-LM loss transformers computes (fp32 logits, mean over supervised tokens), on the
            # positions that have a label only
            loss = outputs.loss if keep is None else torch.nn.functional.cross_entropy(outputs.logits.float(), keep[1])
            acc.backward(loss)
            if acc.sync_gradients and cfg.max_grad_norm and cfg.max_grad_norm > 0:
                self.grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def _cached_embeds(self, batch: dict) -> torch.Tensor:
        from .features import embeds_with_image_features

        model = self.accelerator.unwrap_model(self.model)
        features = self.feature_cache.features_for(model, batch["image_keys"], batch["pixel_values"], batch["missing"],
                                                   batch["input_ids"].device)
        return embeds_with_image_features(model, batch["input_ids"], features)

    # ------------------------------------------------------------------------------------ outputs
    def _save_resume(self) -> Path:
        acc = self.accelerator
        state = {**self.state, "total_steps": self.total_steps, "seed": self.config.seed,
                 "batch_size": self.config.batch_size}
        return self.checkpoints.save(self.state["global_step"], acc.save_state, state, self.is_main, acc.wait_for_everyone)

    def _export(self) -> Path:
        acc, cfg = self.accelerator, self.config
        state_dict = acc.get_state_dict(self.model) if self._zero3() else None
        unwrapped = acc.unwrap_model(self.model)
        self.bundle.model = unwrapped
        parts = parse_trainable(cfg.trainable)
        save_proj = cfg.save_projector if cfg.save_projector is not None else parts == {"projector"}

        def write(tmp: Path) -> None:
            if not self.is_main:
                return
            if save_proj:
                save_projector(unwrapped, tmp / PROJECTOR_FILE)
            save_folder(self.bundle, tmp, state_dict=state_dict,
                        extra_metadata={"stage": cfg.name, "trainable": cfg.trainable})

        return atomic_folder(self.output_dir / "checkpoint", write, self.is_main, acc.wait_for_everyone)

    def _log_window(self, window: dict, epoch: int, progress) -> None:
        now = time.perf_counter()
        seconds = max(now - window["time"], 1e-9)
        loss = window["loss"] / max(1, window["micro"])
        if self.accelerator.num_processes > 1:  # the global batch's loss, not rank 0's share of it
            loss = float(self.accelerator.reduce(torch.tensor(loss, device=self.accelerator.device), "mean"))
        self.last_loss = loss
        record = {"step": self.state["global_step"], "epoch": epoch, "loss": round(loss, 6),
                  "lr": self.scheduler.get_last_lr()[0], "samples_per_second": round(window["samples"] / seconds, 3),
                  "tokens_per_second": round(window["tokens"] / seconds, 1), "rank": self.rank}
        if getattr(self, "grad_norm", None) is not None:
            record["grad_norm"] = round(float(self.grad_norm), 6)
        self._append_log(record)
        if self.config.tensorboard:
            self.accelerator.log({"train/loss": loss, "train/lr": record["lr"]}, step=record["step"])
        progress.set_postfix(loss=f"{loss:.4f}", samples_s=f"{record['samples_per_second']:.1f}")
        window.update(loss=0.0, micro=0, samples=0, tokens=0, time=now)

    def _append_log(self, record: dict) -> None:
        if not self.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "log.jsonl", "a") as fh:
            fh.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def _write_json(self, name: str, data: dict) -> None:
        tmp = self.output_dir / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(self.output_dir / name)

    def _log(self, message: str) -> None:
        if self.is_main:
            print(f"[medvlm rank {self.rank}] {message}", flush=True)

    def _progress(self):
        from tqdm.auto import tqdm

        interactive = sys.stderr.isatty()
        return tqdm(total=self.total_steps, initial=self.state["global_step"], desc=self.config.name,
                    unit="step", disable=not self.is_main or os.environ.get("MEDVLM_NO_PROGRESS") == "1",
                    dynamic_ncols=True, mininterval=0.1 if interactive else 30.0)

    # ------------------------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> dict:
        previous = {}

        def handler(signum, _frame):
            if self._stop_signal is not None:  # second signal: give up immediately
                raise KeyboardInterrupt
            self._stop_signal = signum
            self._log(f"received {signal.Signals(signum).name}; saving a checkpoint after this step")

        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            return {}
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(keep, targets)`` for the loss on supervised tokens only: ``keep[b, p]`` is true where position
    ``p`` predicts a labelled token ``labels[b, p + 1]`` (the causal shift), ``targets`` those labels in
    the order ``logits_to_keep=keep`` returns their logits. ``None`` when nothing in the batch is labelled."""
    following = labels[:, 1:]
    supervised = following != IGNORE_INDEX
    if not bool(supervised.any()):
        return None
    keep = torch.nn.functional.pad(supervised, (0, 1), value=False)
    return keep, following[supervised]


def _reset_accelerate_state() -> None:
    """Let the next stage in this process build its own Accelerator (precision, accumulation and the
    DeepSpeed config may differ); the process group itself stays up."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def _check_deepspeed_consistency(wants_deepspeed: bool) -> None:
    """One process cannot switch between DeepSpeed and plain data parallel once its process group exists."""
    from accelerate.state import DistributedType, PartialState

    if not PartialState._shared_state or not PartialState().initialized:
        return
    started_with_deepspeed = PartialState().distributed_type == DistributedType.DEEPSPEED
    if started_with_deepspeed and not wants_deepspeed:
        raise ConfigError("this process started DeepSpeed for an earlier stage; give every stage a deepspeed config "
                          "(zero2/zero3 may differ), or run the stages in separate processes (curriculum run --only)")


def _ensure_distributed_env() -> None:
    """DeepSpeed needs a process group even for one process; give it a loopback one when not launched."""
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def train_stage(config: StageConfig, bundle: LlavaBundle | None = None) -> TrainResult:
    return Trainer(config, bundle).run()
