"""Conversation data: LLaVA JSON/JSONL records → tokenized examples → padded batches.

- ``read_records`` reads exactly what LLaVA and LLaVA-Med write (a JSON list, or JSONL).
- ``ConversationDataset`` checks every record once up front (structure, ``<image>`` count, image path
  inside its root, image file present, length) and counts the unusable ones by reason; a run whose skip
  rate exceeds ``max_skip_rate`` stops before training on a silently shrunken set. Token ids are
  recomputed per item (cheap), so memory does not grow with token counts.
- ``Collator`` pads per batch (right padding for training) and counts padded tokens, so the trainer can
  report the padding fraction per epoch.
- ``LengthGroupedBatchSampler`` is LLaVA's ``group_by_modality_length`` with a mega-batch multiplier:
  image and text-only records never share a batch, and batches hold records of similar length, which
  cuts padding; its order is a pure function of (seed, epoch), so a resumed run sees the same batches.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .conversation import IGNORE_INDEX, ConversationError, encode
from .imaging import DEFAULT_MAX_PIXELS, ImageLoadError, load_image, mean_colour, pad_to_square

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Unusable data input; the message names the file/record and the fix."""


def read_records(path: str | os.PathLike) -> list[dict]:
    """Records from a LLaVA conversation JSON (a list) or JSONL file (one record per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: conversation file not found")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".jsonl" or (stripped and stripped[0] == "{"):
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); fix or remove that line") from exc
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON at line {exc.lineno} ({exc.msg})") from exc
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of conversation records (LLaVA format)")
    return records


def resolve_image(root: str | os.PathLike | None, relative: str, record_id: str) -> Path:
    """``root / relative``, refusing paths that escape ``root`` (e.g. ``../../etc/passwd``)."""
    if root is None:
        raise DataError(f"record {record_id}: has image {relative!r} but its data source names no 'images' folder")
    root_path = Path(root).resolve()
    candidate = (root_path / relative).resolve()
    if candidate != root_path and root_path not in candidate.parents:
        raise DataError(f"record {record_id}: image path {relative!r} escapes the image folder {root_path}; refused")
    return candidate


@dataclass
class Example:
    record: dict
    image_path: Path | None
    length: int                       # tokens, image tokens included


@dataclass
class SkipReport:
    total: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0                # kept, cut to max_length (overlength: truncate)
    examples: list[str] = field(default_factory=list)   # first few messages, for the log

    def add(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < 20:
            self.examples.append(message)

    @property
    def rate(self) -> float:
        return sum(self.skipped.values()) / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        return {"records": self.total, "skipped": dict(self.skipped), "skip_rate": round(self.rate, 6),
                "truncated": self.truncated,
                "examples": self.examples}


class ConversationDataset(torch.utils.data.Dataset):
    """Validated LLaVA conversations from one or more sources, ready for the collator."""

    def __init__(self, sources: Sequence[Any], bundle, template: str, max_length: int = 2048,
                 overlength: str = "skip", image_aspect_ratio: str = "pad", system: str | None = None,
                 max_skip_rate: float = 1.0, max_image_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.bundle = bundle
        self.max_image_pixels = max_image_pixels
        self.template = template
        self.max_length = max_length
        self.overlength = overlength
        self.image_aspect_ratio = image_aspect_ratio
        self.system = system
        self.report = SkipReport()
        self.feature_cache = None          # a features.FeatureCache when the trainer enables it
        self.examples: list[Example] = []
        for source in sources:
            self._add_source(source)
        if not self.examples:
            raise DataError(f"no usable records in {[str(s.path) for s in sources]}: {self.report.as_dict()['skipped']}")
        if self.report.rate > max_skip_rate:
            raise DataError(
                f"{self.report.rate:.1%} of records are unusable (limit max_skip_rate={max_skip_rate:.1%}): "
                f"{dict(self.report.skipped)}; first: {self.report.examples[:3]}. Fix the data or raise max_skip_rate."
            )
        if self.report.skipped:
            logger.warning("skipped %d of %d records: %s", sum(self.report.skipped.values()), self.report.total,
                           dict(self.report.skipped))

    def _add_source(self, source) -> None:
        records = read_records(source.path)
        for index, record in enumerate(records):
            self.report.total += 1
            record_id = str(record.get("id", f"{Path(source.path).name}#{index}")) if isinstance(record, dict) else f"#{index}"
            try:
                self.examples.append(self._check(record, source, record_id))
            except (ConversationError, DataError) as exc:
                self.report.add(_reason(exc), f"{source.path}: {exc}")

    def _check(self, record: Any, source, record_id: str) -> Example:
        if isinstance(record, dict) and "conversations" not in record and "conversatons" in record:
            record = {**record, "conversations": record["conversatons"]}   # LLaVA-Med's misspelt key, read as it does
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise ConversationError(f"record {record_id}: no 'conversations' list")
        image_path = None
        if record.get("image"):
            image_path = resolve_image(source.images, str(record["image"]), record_id)
            if not image_path.is_file():
                raise DataError(f"record {record_id}: image file {image_path} not found")
        encoded = self._encode(record, image_path is not None, record_id)
        if not any(label != IGNORE_INDEX for label in encoded.labels):
            raise ConversationError(f"record {record_id}: empty answer (no assistant tokens to learn from)")
        length = len(encoded.input_ids)
        if length > self.max_length:
            if self.overlength == "skip":
                raise DataError(f"record {record_id}: {length} tokens > max_length {self.max_length} (overlength: skip)")
            self.report.truncated += 1
            length = self.max_length
        return Example(record=record, image_path=image_path, length=length)

    def _encode(self, record: dict, has_image: bool, record_id: str):
        b = self.bundle
        for turn in record["conversations"]:
            if isinstance(turn, dict) and turn.get("from") in ("gpt", "assistant") and not str(turn.get("value", "")).strip():
                raise ConversationError(f"record {record_id}: empty answer in a gpt turn")
        return encode(self.template, record["conversations"], b.tokenizer, b.image_token_id, b.num_image_tokens,
                      has_image, record_id=record_id, system=self.system)

    # ------------------------------------------------------------------ torch Dataset API
    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        """Signed lengths as LLaVA's ``modality_lengths``: positive with an image, negative text-only."""
        return [e.length if e.image_path is not None else -e.length for e in self.examples]

    def __getitem__(self, index: int) -> dict | None:
        example = self.examples[index]
        record_id = str(example.record.get("id", index))
        pixel_values, image_key = None, None
        if example.image_path is not None:
            if self.feature_cache is not None:
                image_key = self.feature_cache.key_for(example.image_path)
            try:
                if image_key is None or not self.feature_cache.has(image_key):
                    pixel_values = self.pixel_values(example.image_path)
            except ImageLoadError as exc:
                logger.warning("skipping record %s: %s", record_id, exc)
                return {"skip": str(exc)}
        encoded = self._encode(example.record, example.image_path is not None, record_id)
        input_ids, labels = encoded.input_ids, encoded.labels
        if len(input_ids) > self.max_length:
            input_ids, labels = _truncate(input_ids, labels, self.max_length, self.bundle.image_token_id)
        item = {"id": record_id, "input_ids": torch.tensor(input_ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long), "pixel_values": pixel_values,
                "image": str(example.image_path) if example.image_path is not None else None}
        if image_key is not None:
            item["image_key"] = image_key  # features come from the cache, or are computed once from pixel_values
        return item

    def __getitems__(self, indices: list[int]) -> list[dict | None]:
        """A batch's items (the DataLoader's batched fetch); an image that several of them ask about is
        decoded once (image-grouped batches hold several questions about one image)."""
        self._decoded: dict = {}
        try:
            return [self[i] for i in indices]
        finally:
            self._decoded = None

    def pixel_values(self, path: Path) -> torch.Tensor:
        memo = getattr(self, "_decoded", None)
        if memo is not None and path in memo:
            return memo[path]
        pixels = preprocess_image(load_image(path, self.max_image_pixels), self.bundle.image_processor, self.image_aspect_ratio)
        if memo is not None:
            memo[path] = pixels
        return pixels


def preprocess_image(image, image_processor, image_aspect_ratio: str = "pad") -> torch.Tensor:
    """PIL image → ``(3, H, W)`` pixel values, padded to square first as LLaVA's ``pad`` does."""
    if image_aspect_ratio == "pad":
        image = pad_to_square(image, mean_colour(image_processor))
    return image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def _truncate(input_ids: list[int], labels: list[int], max_length: int, image_token_id: int):
    """Cut from the end, never through the image tokens (the model needs all of them or none)."""
    last_image = max((i for i, t in enumerate(input_ids) if t == image_token_id), default=-1)
    if last_image >= max_length:
        raise DataError(f"max_length {max_length} is shorter than the prompt's image tokens; raise max_length")
    return input_ids[:max_length], labels[:max_length]


def _reason(exc: Exception) -> str:
    text = str(exc)
    for key, reason in (("escapes", "image_path_escapes_root"), ("not found", "image_missing"),
                        ("max_length", "too_long"), ("empty answer", "empty_answer"),
                        ("'<image>'", "image_token_count"), ("<image>", "image_token_count")):
        if key in text:
            return reason
    return "malformed_record"


class Collator:
    """Pads a list of examples to the longest; stacks images of the examples that have one."""

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, items: list[dict]) -> dict:
        skipped = [i["skip"] for i in items if "skip" in i]
        items = [i for i in items if "skip" not in i]
        if not items:
            return {"skipped": skipped, "empty": True}
        longest = max(len(i["input_ids"]) for i in items)
        batch_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        batch_labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            cols = slice(0, n) if self.padding_side == "right" else slice(longest - n, longest)
            batch_ids[row, cols] = item["input_ids"]
            batch_labels[row, cols] = item["labels"]
            attention[row, cols] = 1
        images = [i["pixel_values"] for i in items if i["pixel_values"] is not None]
        real_tokens = int(attention.sum())
        keyed = [i for i in items if "image_key" in i]
        cache_fields = {"image_keys": [i["image_key"] for i in keyed],
                        "missing": [j for j, i in enumerate(keyed) if i["pixel_values"] is not None]} if keyed else {}
        return {**cache_fields,
            "input_ids": batch_ids, "labels": batch_labels, "attention_mask": attention,
            "pixel_values": torch.stack(images) if images else None,
            "num_tokens": batch_ids.numel(), "num_pad_tokens": batch_ids.numel() - real_tokens,
            "ids": [i["id"] for i in items], "skipped": skipped,
        }


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Padded tokens ÷ all tokens when ``batches`` are padded to their longest member."""
    pad = total = 0
    for batch in batches:
        longest = max(abs(lengths[i]) for i in batch)
        pad += sum(longest - abs(lengths[i]) for i in batch)
        total += longest * len(batch)
    return pad / total if total else 0.0


def choose_grouping(setting, lengths: Sequence[int], batch_size: int, seed: int, threshold: float = 0.10) -> bool:
    """``auto``: group by length only when random batches would waste ≥ ``threshold`` of their tokens on
    padding; otherwise keep fully random batches (length-homogeneous batches cost some optimisation
    quality, e.g. single-turn VQA where one question type always lands in the same batches)."""
    if setting != "auto":
        return bool(setting)
    random_batches = LengthGroupedBatchSampler(lengths, batch_size, seed, group_by_length=False)._batches()
    return padding_fraction(lengths, random_batches) >= threshold


class LengthGroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of similar length and one modality; the order depends only on (seed, epoch).

    ``group_by_length=False`` gives plain shuffled batches (the reference recipe's random sampler).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, group_by_length: bool = True,
                 megabatch_mult: int = 50, drop_last: bool = False):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.megabatch_mult = megabatch_mult
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if not self.group_by_length:
            n = len(self.lengths)
            return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        return len(self._batches())

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if not self.group_by_length:
            order = torch.randperm(len(self.lengths), generator=generator).tolist()
            return self._chunk(order)
        image = [i for i, n in enumerate(self.lengths) if n > 0]
        text = [i for i, n in enumerate(self.lengths) if n <= 0]
        batches = self._grouped(image, generator) + self._grouped(text, generator)
        permutation = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in permutation]

    def _grouped(self, indices: list[int], generator: torch.Generator) -> list[list[int]]:
        if not indices:
            return []
        shuffled = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        # As transformers' LengthGroupedSampler: small sets get small mega-batches, so batches still
        # mix differently every epoch instead of grouping the same records forever.
        mult = max(1, min(self.megabatch_mult, len(indices) // (4 * self.batch_size)))
        size = self.batch_size * mult
        batches = []
        for start in range(0, len(shuffled), size):
            mega = sorted(shuffled[start:start + size], key=lambda i: -abs(self.lengths[i]))
            batches.extend(self._chunk(mega))
        return batches

    def _chunk(self, order: list[int]) -> list[list[int]]:
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches


class ImageGroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches formed from images, for shared-image packing (``packing.py``): the images are shuffled, the
    questions about each image follow each other, and the sequence is cut into batches of ``batch_size``
    questions — so a batch holds whole images' questions (an image with more questions than fit spills into
    the next batch), and an epoch has as many batches of as many questions as random batching. Text-only
    records are shuffled in among the images, one each. The order depends only on (seed, epoch).

    Compared with LLaVA's random question batches, a batch sees fewer distinct images (about
    ``batch_size`` ÷ questions per image) with several questions each."""

    def __init__(self, images: Sequence[str | None], batch_size: int, seed: int = 0):
        groups: dict = {}
        for index, image in enumerate(images):
            groups.setdefault(("text", index) if image is None else image, []).append(index)
        self.groups = list(groups.values())
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.size = len(images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = []
        for g in torch.randperm(len(self.groups), generator=generator).tolist():
            group = self.groups[g]
            order.extend(group[i] for i in torch.randperm(len(group), generator=generator).tolist())
        for start in range(0, len(order), self.batch_size):
            yield order[start:start + self.batch_size]
