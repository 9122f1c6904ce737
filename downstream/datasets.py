"""VQA-RAD, SLAKE and PathVQA in the layouts people have on disk → VQA records.

A VQA record (DESIGN.md): ``id, image, question, answer, answer_type ∈ {closed, open}, split, dataset``
plus the source's extra fields in ``metadata``. Answers are kept as given (normalising is the metrics'
job). A record whose image is missing is skipped and *counted* (``LoadReport``), never dropped silently.

Layouts (detected from the files under ``root``):

- **VQA-RAD original**: ``VQA_RAD Dataset Public.json`` + ``VQA_RAD Image Folder/``. ``phrase_type``
  ``test_freeform``/``test_para`` mark the test split, ``freeform``/``para`` the training split;
  ``answer_type`` is CLOSED/OPEN as labelled by the authors.
- **VQA-RAD / PathVQA Hugging Face parquet**: ``data/{train,validation,test}-*.parquet`` with ``image`` as
  ``{bytes, path}``, ``question``, ``answer``. These exports have no answer type: closed = the answer is
  yes/no. (For VQA-RAD that gives a different closed set from the original labels, which mark 272 test
  questions closed, some with answers other than yes/no such as "supratentorial".) Images are written
  once to ``<root>/medvlm_images/<split>/`` so training can read files.
- **SLAKE**: ``train.json``/``validate.json``/``test.json`` + ``imgs/``; English questions only by default
  (as LLaVA-Med reports), ``lang`` chooses.
- **PathVQA original**: ``qas/{train,val,test}/*_qa.pkl`` (a list of ``{image, question, answer}``) and
  ``images/{train,val,test}/NAME.jpg``. The pickles are read with an unpickler that refuses every
  class, so a tampered file cannot run code — still, only load pickles from a data-set root you trust.
- **LLaVA-Med's converted JSON** (``test.json``-style conversation records with ``answer_type``): pass the
  JSON file itself as ``root``, images relative to its folder (or ``images=``). Read for every data set.

Each data set is one registered unit (``register_dataset(DatasetSpec(...))`` at the end of this file):
its name, its layouts in detection order (each a ``Layout``: a name, a ``detect(root, split)`` test and a
loader), and the message listing the files it expects. ``DATASETS`` (what the CLI offers) reads the
registry, so adding a data set is one ``DatasetSpec`` and its test.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from medvlm.fileio import atomic_write_bytes

from medvlm.registry import RegisteredNames, lookup, register

SPLIT_ALIASES = {"val": "validation", "validate": "validation", "valid": "validation", "dev": "validation"}


class DatasetLayoutError(FileNotFoundError):
    """A data-set root without the files of any known layout; the message lists what was expected."""


@dataclass
class VQARecord:
    id: str
    image: str
    question: str
    answer: str
    answer_type: str          # "closed" | "open"
    split: str
    dataset: str
    metadata: dict = field(default_factory=dict)


@dataclass
class LoadReport:
    layout: str = ""
    loaded: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < 10:
            self.examples.append(message)


def is_yes_no(answer: str) -> bool:
    return str(answer).strip().lower().rstrip(".") in ("yes", "no")


@dataclass(frozen=True)
class Source:
    """What a loader is asked for."""
    root: Path
    split: str
    lang: str
    dataset: str


@dataclass(frozen=True)
class Layout:
    name: str                                              # recorded as LoadReport.layout
    detect: Callable[[Path, str], bool]                    # (root, split) → does root hold this layout?
    load: Callable[[Source, "LoadReport"], list[VQARecord]]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    layouts: tuple[Layout, ...]                            # tried in order
    expected: str                                          # the files a user should have, for the error message


DATASET_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    return register(DATASET_REGISTRY, spec.name, spec)


DATASETS = RegisteredNames(DATASET_REGISTRY)   # live: every registered name


def load_vqa(dataset: str, root: str | Path, split: str = "test", lang: str = "en",
             images: str | Path | None = None) -> tuple[list[VQARecord], LoadReport]:
    """Records of ``split`` from whichever of the data set's layouts ``root`` holds."""
    name = dataset.lower().replace("_", "-")
    spec = lookup(DATASET_REGISTRY, name, "dataset")
    split = SPLIT_ALIASES.get(split, split)
    root = Path(root)
    report = LoadReport()
    if root.is_file() and root.suffix in (".json", ".jsonl"):
        report.layout = "llava-med-json"
        return _llava_med_json(root, Path(images) if images else root.parent, name, split, report), report
    for layout in spec.layouts:
        if layout.detect(root, split):
            report.layout = layout.name
            return layout.load(Source(root, split, lang, name), report), report
    raise DatasetLayoutError(f"{root}: no {name} data found. Expected one of: {spec.expected}, "
                             "or a LLaVA-Med test.json file")


def _add(records: list, report: LoadReport, record: VQARecord) -> None:
    if not Path(record.image).is_file():
        report.skip("image_missing", f"{record.dataset} {record.id}: image {record.image} not found")
        return
    records.append(record)
    report.loaded += 1


def _vqa_rad_original(source: Source, report: LoadReport) -> list[VQARecord]:
    root, split = source.root, source.split
    data = json.loads((root / "VQA_RAD Dataset Public.json").read_text(encoding="utf-8"))
    image_dir = root / "VQA_RAD Image Folder"
    wanted = {"test": ("test_freeform", "test_para"), "train": ("freeform", "para")}.get(split)
    if wanted is None:
        raise ValueError(f"VQA-RAD has splits train and test, not {split!r}")
    records: list[VQARecord] = []
    for item in data:
        if item.get("phrase_type") not in wanted:
            continue
        kind = str(item.get("answer_type", "")).strip().upper()
        metadata = {k: item.get(k) for k in ("image_organ", "question_type", "phrase_type", "qid_linked_id")
                    if item.get(k) is not None}
        _add(records, report, VQARecord(
            id=str(item["qid"]), image=str(image_dir / item["image_name"]), question=str(item["question"]),
            answer=str(item["answer"]), answer_type="closed" if kind == "CLOSED" else "open", split=split,
            dataset="vqa-rad", metadata=metadata))
    return records


def _slake(source: Source, report: LoadReport) -> list[VQARecord]:
    root, split, lang = source.root, source.split, source.lang
    name = {"validation": "validate"}.get(split, split)
    path = root / f"{name}.json"
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: SLAKE split file not found (expected train.json, validate.json, test.json)")
    records: list[VQARecord] = []
    for item in json.loads(path.read_text(encoding="utf-8")):
        if lang != "all" and item.get("q_lang") != lang:
            continue
        metadata = {k: item.get(k) for k in ("q_lang", "content_type", "modality", "location", "base_type", "img_id")
                    if item.get(k) is not None}
        _add(records, report, VQARecord(
            id=str(item["qid"]), image=str(root / "imgs" / item["img_name"]), question=str(item["question"]),
            answer=str(item["answer"]), answer_type="closed" if str(item.get("answer_type")).upper() == "CLOSED" else "open",
            split=split, dataset="slake", metadata=metadata))
    return records


class _DataOnlyUnpickler(pickle.Unpickler):
    """Lists, dicts, strings and numbers only: any class reference (the way pickles run code) is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data-set pickle")


def _pathvqa_original(source: Source, report: LoadReport) -> list[VQARecord]:
    root, split = source.root, source.split
    name = {"validation": "val"}.get(split, split)
    files = sorted((root / "qas" / name).glob("*_qa.pkl")) or sorted((root / "qas").glob(f"{name}*_qa.pkl"))
    if not files:
        raise DatasetLayoutError(f"{root / 'qas' / name}: no *_qa.pkl (expected qas/{{train,val,test}}/{name}_qa.pkl)")
    records: list[VQARecord] = []
    for file in files:
        with open(file, "rb") as fh:
            items = _DataOnlyUnpickler(fh).load()
        for index, item in enumerate(items):
            image = root / "images" / name / f"{item['image']}.jpg"
            _add(records, report, VQARecord(
                id=f"{name}_{index:06d}", image=str(image), question=str(item["question"]), answer=str(item["answer"]),
                answer_type="closed" if is_yes_no(item["answer"]) else "open", split=split, dataset="pathvqa",
                metadata={"image_name": item["image"]}))
    return records


def _parquet_files(root: Path, split: str) -> list[Path]:
    if not root.is_dir():
        return []
    names = [split] + [k for k, v in SPLIT_ALIASES.items() if v == split]
    found = []
    for name in names:
        found += sorted(root.glob(f"data/{name}-*.parquet")) + sorted(root.glob(f"{name}-*.parquet"))
    return found


def _hf_parquet(source: Source, report: LoadReport) -> list[VQARecord]:
    import pyarrow.parquet as pq

    root, split, dataset = source.root, source.split, source.dataset
    out_dir = root / "medvlm_images" / split
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[VQARecord] = []
    index = 0
    for file in _parquet_files(root, split):
        table = pq.read_table(file, columns=["image", "question", "answer"])
        for row in table.to_pylist():
            image = row["image"] or {}
            data = image.get("bytes")
            if not data:
                report.skip("image_missing", f"{file.name} row {index}: no image bytes")
                index += 1
                continue
            suffix = Path(image.get("path") or "x.jpg").suffix or ".jpg"
            target = out_dir / f"{hashlib.sha256(data).hexdigest()[:20]}{suffix}"
            if not target.is_file():
                atomic_write_bytes(target, data, fsync=False)   # content-named: a lost one is rewritten next time
            _add(records, report, VQARecord(
                id=f"{split}_{index:06d}", image=str(target), question=str(row["question"]), answer=str(row["answer"]),
                answer_type="closed" if is_yes_no(row["answer"]) else "open", split=split, dataset=dataset,
                metadata={"source_path": image.get("path")}))
            index += 1
    return records


def _llava_med_json(path: Path, image_root: Path, dataset: str, split: str, report: LoadReport) -> list[VQARecord]:
    from medvlm.data import read_records

    records: list[VQARecord] = []
    for item in read_records(path):
        turns = item.get("conversations") or item.get("conversatons") or []
        question = str(turns[0]["value"]).replace("<image>", "").strip() if turns else str(item.get("text", ""))
        answer = str(turns[1]["value"]) if len(turns) > 1 else str(item.get("answer", ""))
        kind = str(item.get("answer_type", "")).upper()
        _add(records, report, VQARecord(
            id=str(item.get("id", item.get("question_id"))), image=str(image_root / item["image"]), question=question,
            answer=answer, answer_type="closed" if kind == "CLOSED" else "open", split=split, dataset=dataset,
            metadata={}))
    return records


# ------------------------------------------------------------------------------------ the registered data sets
HF_PARQUET = Layout("hf-parquet", lambda root, split: bool(_parquet_files(root, split)), _hf_parquet)

register_dataset(DatasetSpec(
    "vqa-rad",
    (Layout("vqa-rad-original", lambda root, split: (root / "VQA_RAD Dataset Public.json").is_file(), _vqa_rad_original),
     HF_PARQUET),
    "'VQA_RAD Dataset Public.json' + 'VQA_RAD Image Folder/' (original release), or "
    "data/{train,test}-*.parquet (Hugging Face export)"))

register_dataset(DatasetSpec(
    "slake",
    (Layout("slake", lambda root, split: any((root / f"{s}.json").is_file() for s in ("train", "validate", "test")),
            _slake), HF_PARQUET),
    "train.json, validate.json, test.json + imgs/ (SLAKE release)"))

register_dataset(DatasetSpec(
    "pathvqa",
    (Layout("pathvqa-original", lambda root, split: (root / "qas").is_dir(), _pathvqa_original), HF_PARQUET),
    "qas/{train,val,test}/*_qa.pkl + images/{train,val,test}/ (original split), or "
    "data/{train,validation,test}-*.parquet (Hugging Face export)"))


def to_conversations(records: list[VQARecord], image_root: str | Path) -> list[dict]:
    """Single-turn LLaVA conversations for finetuning: ``<image>\\n{question}`` → ``{answer}``, image paths
    relative to ``image_root`` (the trainer refuses paths that leave their image folder)."""
    root = Path(image_root).resolve()
    return [{"id": r.id, "image": os.path.relpath(Path(r.image).resolve(), root), "answer_type": r.answer_type.upper(),
             "conversations": [{"from": "human", "value": f"<image>\n{r.question}"},
                               {"from": "gpt", "value": r.answer}]} for r in records]


def image_bytes_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dhash(path: str | Path, size: int = 8) -> int:
    """Difference hash (64 bits) of an image for near-duplicate detection; robust to resizing and re-encoding."""
    from medvlm.imaging import load_image

    import numpy as np

    pixels = np.asarray(load_image(path).convert("L").resize((size + 1, size)), dtype=np.int16)
    bits = 0
    for brighter in (pixels[:, :-1] > pixels[:, 1:]).ravel():
        bits = (bits << 1) | int(brighter)
    return bits

