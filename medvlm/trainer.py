"""THE trainer: one loop for every stage (LLaVA stage 1/2, biomedical stages, downstream finetunes).

Features, and how a stage config (``medvlm.config.StageConfig``) switches them:

- **Devices**: single process on CPU or one GPU; multi-GPU / multi-node under ``accelerate launch``,
  ``torchrun`` or ``deepspeed``. ``deepspeed: zero2|zero3|PATH.json`` uses accelerate's DeepSpeed
  plugin (``medvlm/configs/zero{2,3}.json``; ``auto`` values are filled from the stage config).
- **Precision**: ``precision: auto`` is bf16 autocast on GPUs that have it, fp32 otherwise.
- **Trainable parts**: ``trainable: projector | projector+llm | lora (+vision)``; LoRA targets the language
  model only and trains the projector fully. ``init_projector`` loads a stage-1 projector first. LoRA runs
  under ZeRO-3 too: at export each adapter is gathered with its base weight and merged.
- **Optimisation**: AdamW, ``projector_lr`` for the projector (LLaVA's ``mm_projector_lr``), linear warmup
  (``warmup_ratio``) + cosine decay, ``grad_accum``, ``max_grad_norm`` clipping, ``epochs`` or ``max_steps``.
- **The objective** is one method, ``Trainer.compute_loss(model, batch) -> (loss, n_tokens)``: the causal-LM
  cross-entropy on the assistant tokens. New objectives (packing, preference losses) replace that method.
- **Frozen vision features** (``feature_cache``, on by default): each image's selected vision-tower features
  are computed once and reused every later step (``features.py``); exact, skipped when the tower trains.
- **Logits where the loss is** (``answer_logits_only``, on by default): the LM head and the cross-entropy
  run only at positions that predict a supervised token (``logits_to_keep``), not at every image and
  prompt token; the loss is the one transformers computes, exactly, without the [tokens × vocab] logits.
- **Shared-image packing** (``pack_by_image``: off by default, ``true``, or ``auto`` when images average ≥ 1.5
  questions): the questions about one image in a batch share one row — the prompt prefix once, a segment per
  question, a 4D mask and continuing position ids (``packing.py``); batches are formed from images
  (``data.ImageGroupedBatchSampler``). Exact: each question's loss and gradients are those it gets alone.
- **Data**: LLaVA conversation JSON/JSONL, labels on assistant turns only, length-grouped batches
  (``group_by_length``; ``auto`` groups when random batches would pad ≥ 10%), padding fraction logged
  per epoch, unusable records — images that fail to load included — counted by reason against
  ``max_skip_rate``; an epoch without a single usable batch stops the run.
- **Checkpoints**: every ``save_steps`` optimizer steps and at each epoch end, atomically, keeping
  ``keep_last``; a new run with the same ``output_dir`` resumes from the latest complete one with the
  same data order (the batch order is a function of seed and epoch; mid-epoch batches are skipped) —
  if its config is the same: a changed config is refused (``restart=True`` / ``--restart`` starts over,
  keeping the old run until the new one completes); changed log/save settings resume with a warning.
  SIGTERM/SIGINT (Slurm preemption) write a checkpoint and return ``interrupted`` (the CLI exits 3).
- **Outputs**: ``checkpoint/`` (an HF folder that loads with plain transformers; LoRA merged;
  ``mm_projector.safetensors`` too when only the projector trained; its ``COMPLETE`` marker is the one
  record that the stage finished), ``log.jsonl`` (one line per logged step, never repeated after a
  resume), ``metrics.json``, ``loss.png``, ``data_report.json``, ``stage_config.json`` (``.lock`` while a run
  holds the folder: a second run into it is refused); a progress bar with
  loss and samples/s; experiment trackers from ``report_to`` (``tracking.py``: TensorBoard event files in
  ``tensorboard/`` by default, W&B, MLflow, trackio) get the config, loss, learning rate and final metrics.

Read ``Trainer.setup`` then ``Trainer.train``: the parts are built in that order, nothing is hidden.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import (ResumeCheckpoints, atomic_folder, final_checkpoint, merge_lora_gathered,
                         projector_weights, strip_peft_prefix, trim_log)
from .config import ConfigError, StageConfig, config_changes, config_hash, recorded_config, resume_safe, to_dict
from .conversation import IGNORE_INDEX
from .data import (Collator, ConversationDataset, DataError, ImageGroupedBatchSampler, LengthGroupedBatchSampler,
                   choose_grouping)
from . import tracking
from .fileio import FolderLock, atomic_path, atomic_write_json
from .model import (PROJECTOR_FILE, LlavaBundle, apply_trainable, load_model, load_projector, parse_trainable,
                    save_folder, save_projector, trainable_summary)
from .packing import PackedCollator, choose_packing, packed_loss

logger = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).parent / "configs"
PRECISION_NAMES = {"no": "fp32", "bf16": "bf16", "fp16": "fp16", "fp8": "fp8"}
UNREADABLE = "image_unreadable"


@dataclass
class TrainResult:
    output_dir: Path
    checkpoint: Path
    global_step: int
    metrics: dict
    interrupted: bool = False


@dataclass
class LoopState:
    """Everything the loop changes. The first four fields go into each resume checkpoint."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    # this session only
    window_loss: float = 0.0           # since the last log line
    window_micro: int = 0
    window_samples: int = 0
    window_tokens: int = 0
    window_start: float = field(default_factory=time.perf_counter)
    epoch_pad: int = 0                 # padding accounting of the current epoch
    epoch_tokens: int = 0
    epoch_micro: int = 0               # usable batches seen in the current epoch
    failed_loads: int = 0              # image loads that failed (every occurrence)
    unreadable: set = field(default_factory=set)   # distinct failures, counted once in the data report
    last_loss: float = float("nan")
    grad_norm: float | None = None
    stop_signal: int | None = None

    RESUMED = ("global_step", "epoch", "batch_in_epoch", "samples_seen")

    def saved(self) -> dict:
        return {k: getattr(self, k) for k in self.RESUMED}

    def reset_window(self) -> None:
        self.window_loss, self.window_micro, self.window_samples, self.window_tokens = 0.0, 0, 0, 0
        self.window_start = time.perf_counter()


class Trainer:
    """Runs one stage; ``Trainer(config).run()`` is the whole job."""

    def __init__(self, config: StageConfig, bundle: LlavaBundle | None = None, restart: bool = False):
        self.config = config
        self.bundle = bundle
        self.restart = restart
        self.output_dir = Path(config.output_dir)
        self.state = LoopState()

    # ------------------------------------------------------------------------------------ the job
    def run(self) -> TrainResult:
        """The whole stage; one run at a time per ``output_dir`` (a second is refused: ``FolderLock``)."""
        main = int(os.environ.get("RANK", "0")) == 0
        with FolderLock(self.output_dir, "training run") if main else contextlib.nullcontext():
            self._check_previous_run()
            finished = None if self.restart else self._finished_result()
            if finished is not None:
                return finished
            self.setup()
            return self.train()

    def setup(self) -> None:
        """model → trainable parts → data → schedule → optimizer → prepare → resume, in that order."""
        from accelerate.utils import set_seed

        set_seed(self.config.seed)
        self._setup_accelerator()
        self._set_aside_previous_run()
        self._setup_model()
        self._setup_data()
        self._setup_schedule()
        self._setup_optimizer()
        self.model, self.optimizer, self.loader, self.scheduler = self.accelerator.prepare(
            self.bundle.model, self.optimizer, self.loader, self.scheduler)
        self._setup_resume()

    def train(self) -> TrainResult:
        self._begin()
        progress = self._progress()
        try:
            with self._stop_on_signals():
                while self.state.global_step < self.total_steps and self.state.stop_signal is None:
                    self._run_epoch(progress)
        finally:
            progress.close()
        if self.state.stop_signal is not None:
            return self._interrupted()
        return self._finish()

    # ------------------------------------------------------------------------------------ setup pieces
    def _setup_accelerator(self) -> None:
        # A preset is initialised randomly: build it before a ZeRO-3 accelerator exists, so zero.Init
        # does not change its initialisation; real checkpoints load after, partitioned by zero.Init.
        if self.bundle is None and "preset" in self.config.model:
            self.bundle = load_model(self.config.model, quantize=self.config.quantize)
        self.accelerator = self._make_accelerator()
        self.is_main = self.accelerator.is_main_process
        self.rank = self.accelerator.process_index
        tracking.start(self.accelerator, self.config, self.output_dir)

    def _setup_model(self) -> None:
        cfg = self.config
        if self.bundle is None:
            self.bundle = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, quantize=cfg.quantize)
        if cfg.init_projector:
            load_projector(self.bundle.model, cfg.init_projector)
        apply_trainable(self.bundle, cfg.trainable, to_dict(cfg.lora))
        if cfg.gradient_checkpointing:
            self.bundle.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.bundle.model.enable_input_require_grads()
        self.feature_cache = self._make_feature_cache()
        self.template = cfg.template or self.bundle.template
        self.bundle.use_template(self.template)

    def _setup_data(self) -> None:
        cfg, tokenizer = self.config, self.bundle.tokenizer
        if tokenizer.model_max_length < cfg.max_length:  # else it warns on every record longer than its own limit
            tokenizer.model_max_length = cfg.max_length
        self.dataset = ConversationDataset(
            cfg.data, self.bundle, self.template, max_length=cfg.max_length, overlength=cfg.overlength,
            image_aspect_ratio=cfg.image_aspect_ratio, system=cfg.system, max_skip_rate=cfg.max_skip_rate,
            max_image_pixels=cfg.max_image_pixels,
        )
        self.dataset.feature_cache = self.feature_cache
        self.group_by_length = choose_grouping(cfg.group_by_length, self.dataset.lengths, cfg.batch_size, cfg.seed)
        self.sampler = LengthGroupedBatchSampler(self.dataset.lengths, cfg.batch_size, seed=cfg.seed,
                                                 group_by_length=self.group_by_length)
        collate = Collator(tokenizer.pad_token_id)
        images = [str(e.image_path) if e.image_path is not None else None for e in self.dataset.examples]
        self.packed = choose_packing(cfg.pack_by_image, images, self.bundle.model)
        if self.packed:  # batches formed from images; the questions about one image share one prefix (packing.py)
            self.sampler = ImageGroupedBatchSampler(images, cfg.batch_size, seed=cfg.seed)
            collate = PackedCollator(tokenizer.pad_token_id, self.bundle.image_token_id)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=cfg.num_workers, collate_fn=collate,
        )

    def _setup_schedule(self) -> None:
        cfg = self.config
        batches_per_process = math.ceil(len(self.loader) / self.accelerator.num_processes)
        # accelerate ends an accumulation window at the end of the loader, so the last one may be short
        self.steps_per_epoch = max(1, math.ceil(batches_per_process / cfg.grad_accum))
        self.total_steps = cfg.max_steps or max(1, math.ceil(self.steps_per_epoch * cfg.epochs))
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)

    def _setup_optimizer(self) -> None:
        from transformers import get_cosine_schedule_with_warmup

        cfg = self.config
        self.optimizer = self._make_optimizer()
        # accelerate steps a prepared scheduler once per process per optimizer step.
        n = self.accelerator.num_processes
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * self.total_steps) * n,
            num_training_steps=self.total_steps * n,
        )

    def _setup_resume(self) -> None:
        self.checkpoints = ResumeCheckpoints(self.output_dir, self.config.keep_last)
        resumed = self.checkpoints.load_latest(self.accelerator.load_state)
        if resumed:
            self._check_resume(resumed)
            for key in LoopState.RESUMED:
                setattr(self.state, key, resumed[key])
            self._log(f"resumed from {resumed['path']} at step {self.state.global_step}")
        if self.is_main:  # steps after the checkpoint were lost with the crash; they are logged again
            trim_log(self.output_dir / "log.jsonl", self.state.global_step)

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
        kwargs.update(tracking.accelerator_kwargs(cfg, self.output_dir))
        if plugin is None and not torch.cuda.is_available():
            kwargs["cpu"] = True  # under torchrun/accelerate launch without GPUs: gloo across CPU processes
        return Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mixed,
                           deepspeed_plugin=plugin, **kwargs)

    def _deepspeed_config(self, mixed: str) -> dict:
        cfg = self.config
        named = CONFIG_DIR / f"{cfg.deepspeed}.json"
        path = named if named.is_file() else Path(cfg.deepspeed)
        if not path.is_file():
            raise ConfigError(f"deepspeed: {cfg.deepspeed!r} is neither zero2, zero3 nor a JSON file")
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
            raise ConfigError(f"trainable={cfg.trainable!r} leaves no parameter to train")
        groups = [
            {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
            {"params": projector, "lr": cfg.projector_lr or cfg.lr, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.999), eps=1e-8)

    def _check_resume(self, saved: dict) -> None:
        now = {"total_steps": self.total_steps, "seed": self.config.seed, "batch_size": self.config.batch_size}
        for key, value in now.items():
            if saved.get(key) is not None and saved[key] != value:
                logger.warning("resuming with %s=%s but the checkpoint was written with %s=%s; "
                               "the data order or schedule will differ from an uninterrupted run",
                               key, value, key, saved[key])

    # ------------------------------------------------------------------------------------ an earlier run
    def _finished_result(self) -> TrainResult | None:
        final = final_checkpoint(self.output_dir)
        if final is None:
            return None
        metrics_file = self.output_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        print(f"stage {self.config.name}: already finished; checkpoint at {final}")
        return TrainResult(self.output_dir, final, metrics.get("global_step", 0), metrics)

    def _has_previous_run(self) -> bool:
        return final_checkpoint(self.output_dir) is not None or bool(ResumeCheckpoints(self.output_dir).complete())

    def _check_previous_run(self) -> None:
        """Refuse to resume (or call finished) a run made with a different config; ``restart`` starts over,
        but only then: with the same config it resumes, so a requeued ``--restart`` job keeps its progress."""
        recorded = self.output_dir / "stage_config.json"
        if not recorded.is_file() or not self._has_previous_run():
            self.restart = False
            return
        changes = config_changes(recorded_config(json.loads(recorded.read_text())), to_dict(self.config))
        blocking = [f"{key} {change}" for key, change in changes.items() if not resume_safe(key)]
        if blocking and not self.restart:
            raise ConfigError(
                f"{self.output_dir} holds a run made with a different config ({'; '.join(blocking)}); "
                "rerun with --restart to start that stage over (the old run is kept until the new one completes) "
                "or choose another output_dir")
        if blocking:
            return
        if self.restart:
            logger.warning("--restart: %s holds a run with this same config; resuming it", self.output_dir)
            self.restart = False
        if changes:
            logger.warning("resuming %s with changed settings that do not affect the result: %s", self.output_dir,
                           "; ".join(f"{key} {change}" for key, change in changes.items()))

    def _set_aside_previous_run(self) -> None:
        """``restart``: move the earlier run's outputs into ``.replaced-TIME/`` (removed when this run completes)."""
        if not self.restart:
            return
        if self.is_main and self._has_previous_run():
            aside = self.output_dir / time.strftime(".replaced-%Y%m%d-%H%M%S")
            aside.mkdir()
            for name in ("checkpoint", "resume", "log.jsonl", "metrics.json", "loss.png", "data_report.json",
                         "stage_config.json"):
                if (self.output_dir / name).exists():
                    (self.output_dir / name).rename(aside / name)
            self._log(f"restart: the previous run in {self.output_dir} is kept in {aside} until this one completes")
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------------ the loop
    def _begin(self) -> None:
        cfg, acc = self.config, self.accelerator
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            atomic_write_json(self.output_dir / "data_report.json", self.dataset.report.as_dict())
            atomic_write_json(self.output_dir / "stage_config.json", to_dict(cfg))
        self.counts = trainable_summary(self.model)
        self._log(f"stage {cfg.name}: {len(self.dataset)} examples, {self.total_steps} optimizer steps "
                  f"({self.num_epochs} epoch(s)), trainable {self.counts['trainable']:,} / {self.counts['total']:,} "
                  f"parameters, {acc.num_processes} process(es), precision {PRECISION_NAMES.get(acc.mixed_precision)}, "
                  f"template {self.template}, {self._batching()} batches, "
                  f"feature cache {'on' if self.feature_cache else 'off'}")
        self.start_time = time.perf_counter()
        self.samples_at_start = self.state.samples_seen
        self.state.reset_window()
        self.model.train()

    def _run_epoch(self, progress) -> None:
        """One pass over this process's batches (from where a resumed run stopped); returns early on a
        signal (the epoch is unfinished) or at ``total_steps`` (the epoch ends there)."""
        state, seen = self.state, 0
        for batch in self._epoch_loader():
            state.batch_in_epoch += 1
            seen += 1
            self._count_unreadable(batch.get("skipped", []))
            if batch.get("empty"):
                continue
            self._account(batch, self._micro_step(batch))
            if not self.accelerator.sync_gradients:
                continue
            self._after_optimizer_step(progress)
            if state.stop_signal is not None:
                return
            if state.global_step >= self.total_steps:
                break
        self._end_epoch(seen)

    def _epoch_loader(self):
        epoch = self.state.epoch
        self.sampler.set_epoch(epoch)
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)
        if self.state.batch_in_epoch:
            return self.accelerator.skip_first_batches(self.loader, self.state.batch_in_epoch)
        return self.loader

    def _micro_step(self, batch: dict) -> float:
        """Forward, backward and (at the end of an accumulation window) one optimizer step."""
        acc = self.accelerator
        with acc.accumulate(self.model):
            loss, _ = self.compute_loss(self.model, batch)
            acc.backward(loss)
            if acc.sync_gradients and self.config.max_grad_norm and self.config.max_grad_norm > 0:
                self.state.grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        """The training objective — the seam new objectives replace: ``(mean loss, supervised tokens)``.

        The causal-LM loss transformers computes (fp32 logits, mean over supervised tokens); with
        ``answer_logits_only`` the LM head runs only at the positions that have a label."""
        if "segment_ids" in batch:  # shared-image packing: the same loss, one prefix per image (packing.py)
            inputs = {k: v for k, v in self._model_inputs(model, batch).items() if k != "attention_mask"}
            with self.accelerator.autocast() if batch.get("image_keys") else contextlib.nullcontext():
                return packed_loss(model, batch, inputs), int(batch["loss_targets"].numel())
        labels = batch["labels"]
        keep = answer_positions(labels) if self.config.answer_logits_only else None
        head = {"labels": labels} if keep is None else {"logits_to_keep": keep[0]}
        # cached features: the same precision the model's own vision path would run in
        with self.accelerator.autocast() if batch.get("image_keys") else contextlib.nullcontext():
            outputs = model(**self._model_inputs(model, batch), **head)
        n_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
        if keep is None:
            return outputs.loss, n_tokens
        return torch.nn.functional.cross_entropy(outputs.logits.float(), keep[1]), n_tokens

    def _model_inputs(self, model, batch: dict) -> dict:
        """Token ids + pixels, or (feature cache) embeddings with the cached image features in place."""
        if not batch.get("image_keys"):
            return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                    "pixel_values": batch["pixel_values"]}
        from .features import embeds_with_image_features

        base = self.accelerator.unwrap_model(model)
        features = self.feature_cache.features_for(base, batch["image_keys"], batch["pixel_values"], batch["missing"],
                                                   batch["input_ids"].device)
        return {"inputs_embeds": embeds_with_image_features(base, batch["input_ids"], features),
                "attention_mask": batch["attention_mask"]}

    def _batching(self) -> str:
        if self.packed:
            return "image-grouped, packed"
        return "length-grouped" if self.group_by_length else "random"

    def _account(self, batch: dict, loss: float) -> None:
        questions = batch.get("num_questions", int(batch["input_ids"].shape[0]))  # packed rows hold several
        state, n = self.state, questions * self.accelerator.num_processes
        state.window_loss += loss
        state.window_micro += 1
        state.window_samples += n
        state.window_tokens += int(batch["num_tokens"] - batch["num_pad_tokens"])
        state.samples_seen += n
        state.epoch_pad += int(batch["num_pad_tokens"])
        state.epoch_tokens += int(batch["num_tokens"])
        state.epoch_micro += 1

    def _count_unreadable(self, messages: list[str]) -> None:
        """Images that fail to load count once each against ``max_skip_rate``, like records refused up front."""
        state, report = self.state, self.dataset.report
        state.failed_loads += len(messages)
        for message in messages:
            if message not in state.unreadable:
                state.unreadable.add(message)
                report.add(UNREADABLE, message)
        if messages and report.rate > self.config.max_skip_rate:
            raise DataError(
                f"{report.rate:.1%} of records are unusable (limit max_skip_rate={self.config.max_skip_rate:.1%}), "
                f"{len(state.unreadable)} of them images that do not load, e.g. {messages[0]}; "
                "fix the images or raise max_skip_rate")

    def _after_optimizer_step(self, progress) -> None:
        cfg, step = self.config, self.state.global_step + 1
        self.state.global_step = step
        progress.update(1)
        if step % cfg.log_steps == 0 or step == self.total_steps:
            self._log_window(progress)
        if cfg.save_steps and step % cfg.save_steps == 0 and step < self.total_steps:
            self._save_resume()

    def _end_epoch(self, seen: int) -> None:
        state = self.state
        if seen and state.epoch_micro == 0:  # (a run resumed at an epoch's very end sees no batch: fine)
            raise DataError(f"epoch {state.epoch}: no usable batch ({state.failed_loads} image load(s) failed, e.g. "
                            f"{next(iter(state.unreadable), 'none')}); fix the images or the data")
        self._append_log({"event": "epoch_end", "epoch": state.epoch, "step": state.global_step,
                          "padding_fraction": round(state.epoch_pad / max(1, state.epoch_tokens), 4),
                          "skipped_images": state.failed_loads})
        state.epoch_pad = state.epoch_tokens = state.epoch_micro = 0
        state.epoch += 1
        state.batch_in_epoch = 0
        if state.global_step < self.total_steps:
            self._save_resume()

    # ------------------------------------------------------------------------------------ endings
    def _interrupted(self) -> TrainResult:
        path = self._save_resume()
        self._plot()
        name = signal.Signals(self.state.stop_signal).name
        self._log(f"received {name}: saved {path}; resume with the same command (output_dir {self.output_dir})")
        return TrainResult(self.output_dir, path, self.state.global_step, {}, interrupted=True)

    def _finish(self) -> TrainResult:
        metrics = self._metrics()
        if self.is_main:  # before the checkpoint: its COMPLETE marker is the last thing written
            atomic_write_json(self.output_dir / "metrics.json", metrics)
        checkpoint = self._export(metrics)
        self._plot()
        if self.is_main:
            for old in self.output_dir.glob(".replaced-*"):
                shutil.rmtree(old, ignore_errors=True)
        self._log(f"stage {self.config.name}: done, final loss {self.state.last_loss:.4f}; checkpoint at {checkpoint}")
        if self.config.report_to:
            self.accelerator.log(tracking.numbers(metrics, "final"), step=self.state.global_step)
        for tracker in self.accelerator.trackers:  # not end_training(): the process group must outlive this stage
            tracker.finish()
        _reset_accelerate_state()
        return TrainResult(self.output_dir, checkpoint, self.state.global_step, metrics)

    def _metrics(self) -> dict:
        state, elapsed = self.state, time.perf_counter() - self.start_time
        return {
            "global_step": state.global_step, "epochs": round(state.global_step / self.steps_per_epoch, 4),
            "samples_seen": state.samples_seen, "final_loss": state.last_loss, "train_seconds": round(elapsed, 3),
            "samples_per_second": round((state.samples_seen - self.samples_at_start) / max(elapsed, 1e-9), 3),
            "skipped_images": state.failed_loads, "data": self.dataset.report.as_dict(),
            "trainable_parameters": self.counts["trainable"], "config_hash": config_hash(to_dict(self.config)),
        }

    def _save_resume(self) -> Path:
        acc = self.accelerator
        saved = {**self.state.saved(), "total_steps": self.total_steps, "seed": self.config.seed,
                 "batch_size": self.config.batch_size, "config_hash": config_hash(to_dict(self.config))}
        return self.checkpoints.save(self.state.global_step, acc.save_state, saved, self.is_main, acc.wait_for_everyone)

    def _export(self, metrics: dict) -> Path:
        """The HF folder, with its model card (``modelcard.py``: this stage appended to the lineage)."""
        from safetensors.torch import save_file

        from .modelcard import add_stage, stage_record

        acc, cfg = self.accelerator, self.config
        unwrapped = acc.unwrap_model(self.model)
        state_dict = None
        if self._zero3():  # partitioned weights: gathered to rank 0's CPU
            if hasattr(unwrapped, "get_base_model"):  # LoRA: each adapter merged into its gathered base weight
                unwrapped = merge_lora_gathered(unwrapped)  # in place: the engine now holds the merged modules
            state_dict = strip_peft_prefix(acc.get_state_dict(self.model))
        self.bundle.model = unwrapped
        parts = parse_trainable(cfg.trainable)
        save_proj = cfg.save_projector if cfg.save_projector is not None else parts == {"projector"}
        metadata = {"stage": cfg.name, "trainable": cfg.trainable, "config_hash": config_hash(to_dict(cfg))}

        def write(tmp: Path) -> None:
            if not self.is_main:
                return
            if save_proj and state_dict is not None:  # ZeRO-3: the modules hold partitions; the state dict is whole
                save_file(projector_weights(state_dict), str(tmp / PROJECTOR_FILE))
            elif save_proj:
                save_projector(unwrapped, tmp / PROJECTOR_FILE)
            save_folder(self.bundle, tmp, state_dict=state_dict, extra_metadata=metadata)
            add_stage(tmp, stage_record(cfg, metrics))

        return atomic_folder(self.output_dir / "checkpoint", write, self.is_main, acc.wait_for_everyone)

    # ------------------------------------------------------------------------------------ logging
    def _log_window(self, progress) -> None:
        state, acc = self.state, self.accelerator
        now = time.perf_counter()
        seconds = max(now - state.window_start, 1e-9)
        loss = state.window_loss / max(1, state.window_micro)
        if acc.num_processes > 1:  # the global batch's loss, not rank 0's share of it
            loss = float(acc.reduce(torch.tensor(loss, device=acc.device), "mean"))
        state.last_loss = loss
        record = {"step": state.global_step, "epoch": state.epoch, "loss": round(loss, 6),
                  "lr": self.scheduler.get_last_lr()[0], "samples_per_second": round(state.window_samples / seconds, 3),
                  "tokens_per_second": round(state.window_tokens / seconds, 1), "rank": self.rank}
        if state.grad_norm is not None:
            record["grad_norm"] = round(float(state.grad_norm), 6)
        self._append_log(record)
        if self.config.report_to:
            acc.log({"train/loss": loss, "train/lr": record["lr"], "train/samples_per_second": record["samples_per_second"]},
                    step=record["step"])
        progress.set_postfix(loss=f"{loss:.4f}", samples_s=f"{record['samples_per_second']:.1f}")
        state.reset_window()

    def _append_log(self, record: dict) -> None:
        if not self.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "log.jsonl", "a") as fh:
            fh.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def _plot(self) -> None:
        if self.is_main:
            plot_loss(self.output_dir / "log.jsonl", self.output_dir / "loss.png", self.config.name)

    def _log(self, message: str) -> None:
        if self.is_main:
            print(f"[medvlm rank {self.rank}] {message}", flush=True)

    def _progress(self):
        from tqdm.auto import tqdm

        interactive = sys.stderr.isatty()
        return tqdm(total=self.total_steps, initial=self.state.global_step, desc=self.config.name,
                    unit="step", disable=not self.is_main or os.environ.get("MEDVLM_NO_PROGRESS") == "1",
                    dynamic_ncols=True, mininterval=0.1 if interactive else 30.0)

    # ------------------------------------------------------------------------------------ signals
    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGTERM/SIGINT set ``state.stop_signal``; the loop saves after the current step. A second one aborts."""
        def handler(signum, _frame):
            if self.state.stop_signal is not None:
                raise KeyboardInterrupt
            self.state.stop_signal = signum
            self._log(f"received {signal.Signals(signum).name}; saving a checkpoint after this step")

        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: no handlers
            pass
        try:
            yield
        finally:
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


def plot_loss(log_file: Path, out: Path, title: str) -> Path | None:
    """``loss.png``: the logged training loss per optimizer step (nothing when no step was logged)."""
    if not log_file.is_file():
        return None
    rows = [json.loads(line) for line in log_file.read_text().splitlines() if '"loss"' in line]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="optimizer step", ylabel="training loss", title=title)
    fig.tight_layout()
    with atomic_path(out, fsync=False) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out


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


def train_stage(config: StageConfig, bundle: LlavaBundle | None = None, restart: bool = False) -> TrainResult:
    return Trainer(config, bundle, restart=restart).run()
