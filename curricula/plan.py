"""A curriculum YAML → a plan: every variant of the sweep as a chain of stage nodes, each keyed by a hash
of its resolved settings, its inputs and its parent's key — so variants that share a prefix share those
stages (and their checkpoints), and a changed stage or input changes every key after it.

Curriculum YAML::

    name: llava-med
    model: {compose: {vision: openai/clip-vit-large-patch14-336, llm: lmsys/vicuna-7b-v1.5}}
    defaults: {batch_size: 16, deepspeed: zero3}          # optional: settings for every train/finetune stage
    world_size: 8                                           # optional: for `curriculum show`'s step counts
    stages:
      - {name: llava_align, kind: train, trainable: projector, template: plain, data: [...], epochs: 1, lr: 1e-3}
      - {name: finetune, kind: finetune, datasets: [{name: vqa-rad, root: data/vqa_rad}], epochs: 9}
      - {name: eval, kind: eval, split: test, baseline: true}
    sweep:
      finetune.epochs: [1, 3, 9]

Any stage may say ``skip: true`` (useful in a sweep: ``bio_instruct.skip: [false, true]`` is the ablation
with and without that stage). Stage kinds (``train``, ``finetune``, ``eval``) are registered units in
``kinds.py``: their keys, data-set fan-out and settings are checked here, before anything runs.

A node's inputs are its conversation files and its data set's root; a root folder's digest covers every
file under it (names and contents), so any change to a data set makes its stages stale.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from medvlm.config import ConfigError, apply_overrides, check_model_source, load_yaml

from .kinds import KINDS, STAGE_KEYS, StageKind, kind_of

CURRICULUM_KEYS = {"name", "model", "defaults", "stages", "sweep", "world_size"}
DERIVED_FOLDER = "medvlm_images"   # images medvlm converts inside a data set root (e.g. from parquet): not input


@dataclass
class Node:
    """One stage instance in the plan (a finetune or eval stage has one node per data set)."""

    name: str                    # display name, e.g. "finetune[vqa-rad]"
    stage: str                   # the YAML stage name
    kind: str
    settings: dict
    parent: "Node | None"
    dataset: dict | None = None
    key: str = ""
    inputs: dict = field(default_factory=dict)   # input file → content hash

    @property
    def folder_name(self) -> str:
        safe = self.name.replace("[", "-").replace("]", "").replace("/", "_")
        return f"{safe}-{self.key[:10]}"

    @property
    def model_parent(self) -> "Node | None":
        """The nearest ancestor that produced weights (eval nodes produce none)."""
        node = self.parent
        while node is not None and not KINDS[node.kind].produces_weights:
            node = node.parent
        return node


@dataclass
class Plan:
    name: str
    model: dict
    variants: dict[str, list[Node]]     # variant label → its nodes in execution order
    base_dir: Path
    world_size: int = 1

    @property
    def nodes(self) -> list[Node]:
        """Every distinct node, in an order where parents come first."""
        seen, ordered = set(), []
        for nodes in self.variants.values():
            for node in nodes:
                if node.key not in seen:
                    seen.add(node.key)
                    ordered.append(node)
        return ordered


def load_curriculum(path: str | Path, overrides: list[str] | None = None) -> dict:
    data = apply_overrides(load_yaml(path), overrides or [])
    unknown = set(data) - CURRICULUM_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown curriculum key(s) {sorted(unknown)}; valid: {sorted(CURRICULUM_KEYS)}")
    if not data.get("stages"):
        raise ConfigError(f"{path}: a curriculum needs a non-empty 'stages' list")
    if "model" not in data:
        raise ConfigError(f"{path}: a curriculum needs 'model' ({{preset: tiny}}, {{checkpoint: DIR}} or {{compose: ...}})")
    try:
        check_model_source(data["model"] if isinstance(data["model"], dict) else {})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return data


def build_plan(data: dict, base_dir: str | Path, hash_inputs: bool = True) -> Plan:
    base_dir = Path(base_dir)
    names = [s.get("name") for s in data["stages"]]
    if len(set(names)) != len(names) or None in names:
        raise ConfigError(f"stage names must be present and unique; got {names}")
    variants = {}
    for label, stages in _sweep_variants(data):
        variants[label] = _chain(stages, data, base_dir, hash_inputs)
    return Plan(data.get("name", "curriculum"), data["model"], variants, base_dir, int(data.get("world_size", 1)))


def _sweep_variants(data: dict) -> list[tuple[str, list[dict]]]:
    sweep = data.get("sweep") or {}
    stage_names = {s["name"] for s in data["stages"]}
    for key in sweep:
        stage = key.split(".", 1)[0]
        if stage not in stage_names or "." not in key:
            raise ConfigError(f"sweep key {key!r}: expected STAGE.SETTING with STAGE one of {sorted(stage_names)}")
        if not isinstance(sweep[key], list) or not sweep[key]:
            raise ConfigError(f"sweep key {key!r}: expected a non-empty list of values")
    keys = list(sweep)
    out = []
    for values in itertools.product(*(sweep[k] for k in keys)) if keys else [()]:
        stages = copy.deepcopy(data["stages"])
        by_name = {s["name"]: s for s in stages}
        for key, value in zip(keys, values):
            stage, setting = key.split(".", 1)
            by_name[stage].update(apply_overrides({}, [f"{setting}={json.dumps(value)}"]))
        label = ", ".join(f"{k}={_short(v)}" for k, v in zip(keys, values)) or "default"
        out.append((label, stages))
    return out


def _short(value) -> str:
    if isinstance(value, list):
        return "+".join(Path(v["path"] if isinstance(v, dict) else str(v)).stem for v in value) if value else "none"
    return str(value)


def _chain(stages: list[dict], data: dict, base_dir: Path, hash_inputs: bool) -> list[Node]:
    defaults = data.get("defaults") or {}
    branches: list[Node | None] = [None]
    nodes: list[Node] = []
    for stage in stages:
        kind = kind_of(stage)
        _check_keys(stage, kind)
        if stage.get("skip"):
            continue  # an ablation without this stage: its successor starts from its parent
        settings = kind.settings(stage, defaults)
        new_branches: list[Node | None] = []
        for parent in branches:
            for dataset in kind.fan_out(stage, parent):
                name = stage["name"] + (f"[{dataset['name']}]" if dataset else "")
                node = Node(name, stage["name"], kind.name, copy.deepcopy(settings), parent, dataset)
                node.inputs = _inputs(node, base_dir, hash_inputs)
                node.key = _key(node, data["model"])
                nodes.append(node)
                new_branches.append(node)
        branches = new_branches
    return nodes


def _check_keys(stage: dict, kind: StageKind) -> None:
    allowed = kind.keys | STAGE_KEYS
    unknown = set(stage) - allowed
    if unknown:
        import difflib

        key = sorted(unknown)[0]
        close = difflib.get_close_matches(key, allowed, n=1)
        raise ConfigError(f"stage {stage['name']}: unknown key '{key}'" + (f"; did you mean '{close[0]}'?" if close else ""))


def input_paths(node: Node, base_dir: Path) -> list[Path]:
    """The files a node reads: its conversation files and its data set's root (folder or file)."""
    paths = [resolve(base_dir, s["path"] if isinstance(s, dict) else s) for s in node.settings.get("data") or []]
    if node.dataset and node.dataset.get("root"):
        paths.append(resolve(base_dir, node.dataset["root"]))
    return paths


class MissingInputs(ConfigError):
    """A curriculum names data files or data set roots that do not exist."""


def require_inputs(nodes: list[Node], base_dir: Path) -> None:
    """Fail naming every missing input of ``nodes`` (before hours of earlier stages, not after)."""
    missing = list(dict.fromkeys(f"{node.name}: {p}" for node in nodes for p in input_paths(node, base_dir)
                                 if not p.exists()))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise MissingInputs(f"missing input(s): {'; '.join(missing[:5])}{more}; fix the paths in the curriculum "
                            f"(relative ones are relative to {base_dir}, see --base-dir) or create the data first")


def _inputs(node: Node, base_dir: Path, hash_inputs: bool) -> dict:
    """input path → digest; a folder's digest covers every file under it (names and contents)."""
    return {str(p): (path_digest(p) if hash_inputs else "unhashed") for p in input_paths(node, base_dir)}


def path_digest(path: Path) -> str:
    if not path.is_dir():
        return file_digest(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and DERIVED_FOLDER not in p.parts):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_digest(file)}\n".encode())
    return digest.hexdigest()


def resolve_source(base_dir: Path, source) -> dict:
    """A stage's ``data`` entry with absolute ``path`` and ``images``."""
    source = {"path": source} if isinstance(source, str) else dict(source)
    source["path"] = str(resolve(base_dir, source["path"]))
    if source.get("images"):
        source["images"] = str(resolve(base_dir, source["images"]))
    return source


def resolve(base_dir: Path, path: str) -> Path:
    path = Path(path)
    return path if path.is_absolute() else (base_dir / path)


def file_digest(path: Path, full_limit: int = 64 << 20) -> str:
    """sha256 of the file (of its size + first and last 8 MiB beyond 64 MiB); ``missing`` when absent."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= full_limit:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        else:
            digest.update(fh.read(8 << 20))
            fh.seek(-(8 << 20), 2)
            digest.update(fh.read())
    return digest.hexdigest()


def _key(node: Node, model: dict) -> str:
    payload = {"kind": node.kind, "settings": node.settings, "dataset": node.dataset, "inputs": node.inputs,
               "parent": node.parent.key if node.parent else json.dumps(model, sort_keys=True)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
