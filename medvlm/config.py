"""Typed stage configs loaded from YAML, with ``--set a.b=c`` overrides.

Every key is checked: an unknown key fails with the nearest valid name, a wrong type fails naming the
key, the expected type and the value, a value out of range (``lr: -1``, ``epochs: 0``, ``batch_size: 0``)
names the allowed range, and ``trainable``/``template`` are checked against the parts and templates that
exist, with did-you-mean. YAML 1.1 reads ``1e-3`` as a string; float fields accept it.

``config_hash`` / ``config_changes`` tell whether a stage's settings changed between two runs in the same
output folder; ``RESUME_SAFE_KEYS`` are the settings that cannot change what is learned (logging,
checkpoint cadence, exact speed-ups), so changing them never blocks a resume.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .conversation import template_names  # the registry, read at each check


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the fix."""


@dataclass
class DataSource:
    """One conversation file (LLaVA JSON/JSONL) and the folder its ``image`` paths are relative to."""

    path: str
    images: str | None = None


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None

    def __post_init__(self):
        _check_ranges(self, LORA_RANGES, "lora.")


@dataclass
class StageConfig:
    """One training stage. ``medvlm train STAGE.yaml`` runs exactly this; curricula build these."""

    name: str = "stage"
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    init_projector: str | None = None          # LLaVA's pretrain_mm_mlp_adapter
    trainable: str = "projector+llm"            # projector | projector+llm | lora | ...+vision
    lora: LoraSettings = field(default_factory=LoraSettings)
    quantize: Literal["none", "4bit"] = "none"  # 4bit: QLoRA (bitsandbytes NF4) with trainable: lora
    data: list[DataSource] = field(default_factory=list)
    template: str | None = None                 # llava_v1 | plain | chat_template; None: the model's own
    system: str | None = None
    output_dir: str = "runs/stage"
    epochs: float = 1.0
    max_steps: int | None = None                # optimizer steps; overrides epochs when set
    batch_size: int = 4                         # per device
    grad_accum: int = 1
    lr: float = 2e-5
    projector_lr: float | None = None           # LLaVA's mm_projector_lr
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    max_length: int = 2048
    overlength: Literal["skip", "truncate"] = "skip"
    image_aspect_ratio: Literal["pad", "resize"] = "pad"
    max_image_pixels: int = 64_000_000         # larger images are skipped undecoded (image_unreadable)
    group_by_length: bool | Literal["auto"] = "auto"   # auto: group when random batches would pad ≥ 10%
    pack_by_image: bool | Literal["auto"] = False      # questions about one image share one prefix (packing.py)
    seed: int = 42
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    deepspeed: str | None = None                # zero2 | zero3 | path to a DeepSpeed JSON
    gradient_checkpointing: bool = False
    feature_cache: bool = True                  # reuse frozen vision features (exact; medvlm/features.py)
    feature_cache_dir: str | None = None        # also keep them on disk (large sets, later stages)
    answer_logits_only: bool = True             # LM head + loss at supervised positions only (exact)
    save_steps: int = 0                         # 0: checkpoint at each epoch end only
    keep_last: int = 2
    log_steps: int = 10
    num_workers: int = 0
    save_projector: bool | None = None          # None: yes when only the projector trains
    max_skip_rate: float = 0.05                 # stop if more records than this fraction are unusable
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # + wandb | mlflow | trackio; []: none
    project: str = "medvlm"                     # tracker project / MLflow experiment (a curriculum: its name)
    run_name: str | None = None                 # tracker run name; None: the stage name
    trust_remote_code: bool = False

    def __post_init__(self):
        _check_ranges(self, STAGE_RANGES)
        check_trainable(self.trainable)
        check_template(self.template)
        if self.quantize == "4bit" and ("lora" not in self.trainable.split("+") or self.deepspeed):
            raise ConfigError(f"quantize: 4bit trains LoRA adapters on a frozen 4-bit model (QLoRA): set trainable: lora "
                              f"and no deepspeed (got trainable: {self.trainable}, deepspeed: {self.deepspeed})")
        check_model_source(self.model)
        check_trackers(self.report_to)


def _positive(v):
    return v > 0


def _at_least_one(v):
    return v >= 1


def _non_negative(v):
    return v >= 0


def _fraction(v):
    return 0 <= v <= 1


# field → (test, what the test asks for); None passes where the field is optional
STAGE_RANGES = {
    "lr": (_positive, "> 0"), "projector_lr": (_positive, "> 0 (or unset: lr)"), "epochs": (_positive, "> 0"),
    "max_steps": (_at_least_one, ">= 1 (or unset: epochs decide)"), "batch_size": (_at_least_one, ">= 1"),
    "grad_accum": (_at_least_one, ">= 1"), "weight_decay": (_non_negative, ">= 0"),
    "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"), "max_grad_norm": (_non_negative, ">= 0 (0: no clipping)"),
    "max_length": (_at_least_one, ">= 1"), "save_steps": (_non_negative, ">= 0 (0: at epoch ends only)"),
    "keep_last": (_at_least_one, ">= 1"), "log_steps": (_at_least_one, ">= 1"),
    "num_workers": (_non_negative, ">= 0"), "max_image_pixels": (_at_least_one, ">= 1"), "max_skip_rate": (_fraction, "in [0, 1]"),
}
LORA_RANGES = {"r": (_at_least_one, ">= 1"), "alpha": (_positive, "> 0"), "dropout": (lambda v: 0 <= v < 1, "in [0, 1)")}
MODEL_SOURCES = ("checkpoint", "compose", "preset")
PRESETS = ("tiny",)
# settings that cannot change what a run learns: changing them between runs resumes with a warning
RESUME_SAFE_KEYS = frozenset({"name", "output_dir", "log_steps", "save_steps", "keep_last", "num_workers",
                              "report_to", "project", "run_name", "feature_cache", "feature_cache_dir", "answer_logits_only",
                              "gradient_checkpointing", "max_skip_rate", "trust_remote_code", "save_projector"})


def _check_ranges(obj, ranges: dict, prefix: str = "") -> None:
    for name, (test, wanted) in ranges.items():
        value = getattr(obj, name)
        if value is None:
            continue
        if isinstance(value, float) and math.isnan(value) or not test(value):
            raise ConfigError(f"'{prefix}{name}' must be {wanted}; got {value!r}")


def _did_you_mean(value: str, choices) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def check_trackers(report_to: list[str]) -> None:
    from .tracking import TrackerError, check_names

    try:
        check_names(report_to)
    except TrackerError as exc:
        raise ConfigError(str(exc)) from exc


def check_trainable(policy: str) -> None:
    """``projector``, ``projector+llm``, ``lora``, ... (parts joined by '+'), with did-you-mean."""
    from .model import TRAINABLE_PARTS, parse_trainable

    for part in (p.strip() for p in policy.split("+")):
        if part not in TRAINABLE_PARTS:
            raise ConfigError(f"'trainable: {policy}': unknown part {part!r}; {_did_you_mean(part, TRAINABLE_PARTS)}"
                              f"combine {', '.join(TRAINABLE_PARTS)} with '+', e.g. projector+llm")
    try:
        parse_trainable(policy)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def check_template(template: str | None) -> None:
    if template is None:
        return
    names = template_names()
    if template not in names:
        raise ConfigError(f"'template: {template}' is not a template; {_did_you_mean(template, names)}"
                          f"choose one of {', '.join(names)} (or leave it out: the model's own)")


def check_model_source(source: dict) -> None:
    named = [k for k in source if k != "vision" or "checkpoint" not in source]   # vision: for LLaVA-format folders
    if len(named) != 1 or named[0] not in MODEL_SOURCES:
        raise ConfigError(f"'model' must have exactly one of {', '.join(MODEL_SOURCES)}; got {source!r}")
    if "preset" in source and source["preset"] not in PRESETS:
        raise ConfigError(f"'model.preset: {source['preset']}' is unknown; "
                          f"{_did_you_mean(str(source['preset']), PRESETS)}presets: {', '.join(PRESETS)}")


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "model":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: dict, new: dict) -> dict[str, str]:
    """``{"lr": "0.001 → 0.002", "data": "changed"}``: the settings that differ between two stage configs."""
    old, new = _flat(json.loads(json.dumps(old, default=str))), _flat(json.loads(json.dumps(new, default=str)))
    changes = {}
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            a, b = old.get(key), new.get(key)
            short = all(not isinstance(v, (list, dict)) and len(str(v)) <= 40 for v in (a, b))
            changes[key] = f"{a} → {b}" if short else "changed"
    return changes


def recorded_config(recorded: dict) -> dict:
    """A ``stage_config.json`` written by an earlier version, as this version would write it: settings
    since removed are dropped and settings added since are at their defaults (which is what the earlier
    version did), so a new field never blocks resuming or finishing an old run."""
    known = {f.name: f for f in dataclasses.fields(StageConfig)}
    completed = {key: value for key, value in recorded.items() if key in known}
    for name, f in known.items():
        if name not in completed and (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            completed[name] = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
    return completed


def resume_safe(key: str) -> bool:
    return key.split(".")[0] in RESUME_SAFE_KEYS


def config_hash(config: dict) -> str:
    """sha256 of the settings that decide what is learned (``RESUME_SAFE_KEYS`` left out)."""
    kept = {k: v for k, v in config.items() if k not in RESUME_SAFE_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["lr=1e-4", "lora.r=16", "data.0.path=x.json"]`` applied to a nested dict (values parsed as YAML)."""
    data = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set lr=1e-4")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node: Any = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from ``data``, checking names and types recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{name}'{hint}")
        kwargs[key] = _coerce(hints[key], value, name)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where or cls.__name__}: missing required key(s) {', '.join(missing)}")
    return cls(**kwargs)


def _coerce(hint, value, name: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"'{name}': invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"'{name}' must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"'{name}' must be a list; got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{name}.{i}") for i, v in enumerate(value)] if args else value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{name}' must be a mapping; got {type(value).__name__} {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if hint is DataSource and isinstance(value, str):
            return DataSource(path=value)
        return from_dict(hint, value, name)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{name}' must be true or false; got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"'{name}' must be an integer; got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{name}' must be a number; got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"'{name}' must be a string; got {type(value).__name__} {value!r}")
    return value


def load_stage(path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None) -> StageConfig:
    """Stage config from a YAML file (paths in it are relative to the file) and ``--set`` overrides."""
    raw = load_yaml(path) if path is not None else (data or {})
    raw = apply_overrides(raw, overrides or [])
    config = from_dict(StageConfig, raw)
    if path is not None:
        resolve_paths(config, Path(path).parent)
    return config


def resolve_paths(config: StageConfig, base: Path) -> None:
    """Make relative data/image/output paths relative to ``base`` (the YAML file's folder)."""
    def fix(p: str | None) -> str | None:
        if p is None or Path(p).is_absolute():
            return p
        return str((base / p).resolve())

    for source in config.data:
        source.path = fix(source.path)
        source.images = fix(source.images) if source.images is not None else None
    if config.init_projector:
        config.init_projector = fix(config.init_projector)
    config.output_dir = fix(config.output_dir)
    if "checkpoint" in config.model and isinstance(config.model["checkpoint"], str):
        candidate = base / config.model["checkpoint"]
        if candidate.exists():
            config.model = {"checkpoint": str(candidate.resolve())}


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
