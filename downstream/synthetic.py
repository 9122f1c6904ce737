"""Write small VQA sets in each real on-disk layout (for the demo, the tests and the benchmarks).

Every writer takes ``VQAItem``s (a PIL image and its question) and lays them out exactly as the
public release does, so the loaders in ``datasets.py`` are exercised on the real formats.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


@dataclass
class VQAItem:
    image: Image.Image
    image_name: str            # file stem, unique per image
    question: str
    answer: str
    answer_type: str           # "CLOSED" | "OPEN"
    split: str                 # "train" | "test" (| "validation")
    extra: dict = field(default_factory=dict)   # organ, question_type, modality…


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        image.convert("RGB").save(path, quality=95)


def write_vqa_rad_original(root: str | Path, items: list[VQAItem]) -> Path:
    root = Path(root)
    records = []
    for qid, item in enumerate(items, 1):
        _save(item.image, root / "VQA_RAD Image Folder" / f"{item.image_name}.jpg")
        phrase = "test_freeform" if item.split == "test" else "freeform"
        records.append({"qid": qid, "image_name": f"{item.image_name}.jpg", "image_case_url": "",
                        "image_organ": item.extra.get("organ", "CHEST"), "answer": item.answer,
                        "answer_type": item.answer_type, "question_type": item.extra.get("question_type", "MODALITY"),
                        "question": item.question, "question_rephrase": "NULL", "question_relation": "NULL",
                        "qid_linked_id": f"{qid:04d}", "phrase_type": phrase, "evaluation": "given"})
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(records, indent=1))
    return root


def write_hf_parquet(root: str | Path, items: list[VQAItem]) -> Path:
    """The Hugging Face export layout: ``data/{split}-00000-of-00001.parquet`` with image {bytes, path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split in sorted({i.split for i in items}):
        rows = []
        for item in (i for i in items if i.split == split):
            buffer = io.BytesIO()
            item.image.convert("RGB").save(buffer, format="JPEG", quality=95)
            rows.append({"image": {"bytes": buffer.getvalue(), "path": f"{item.image_name}.jpg"},
                         "question": item.question, "answer": item.answer})
        table = pa.Table.from_pylist(rows)
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def write_slake(root: str | Path, items: list[VQAItem], chinese_copies: bool = True) -> Path:
    root = Path(root)
    by_split: dict[str, list] = {"train": [], "validate": [], "test": []}
    qid = 0
    for item in items:
        _save(item.image, root / "imgs" / item.image_name / "source.jpg")
        split = {"validation": "validate"}.get(item.split, item.split)
        langs = ["en", "zh"] if chinese_copies else ["en"]
        for lang in langs:
            qid += 1
            question = item.question if lang == "en" else f"（中文）{item.question}"
            by_split[split].append({
                "img_id": abs(hash(item.image_name)) % 1000, "img_name": f"{item.image_name}/source.jpg",
                "question": question, "answer": item.answer, "q_lang": lang, "location": item.extra.get("organ", "Chest"),
                "modality": item.extra.get("modality", "CT"), "answer_type": item.answer_type,
                "base_type": "vqa", "content_type": item.extra.get("question_type", "Modality"), "triple": ["vhead", "_", "_"],
                "qid": qid})
    for split, records in by_split.items():
        (root / f"{split}.json").write_text(json.dumps(records, ensure_ascii=False, indent=1))
    return root


def write_pathvqa_original(root: str | Path, items: list[VQAItem]) -> Path:
    root = Path(root)
    for split in sorted({i.split for i in items}):
        name = {"validation": "val"}.get(split, split)
        records = []
        for item in (i for i in items if i.split == split):
            _save(item.image, root / "images" / name / f"{item.image_name}.jpg")
            records.append({"image": item.image_name, "question": item.question, "answer": item.answer})
        (root / "qas" / name).mkdir(parents=True, exist_ok=True)
        with open(root / "qas" / name / f"{name}_qa.pkl", "wb") as fh:
            pickle.dump(records, fh)
    return root


def write_llava_med_json(path: str | Path, items: list[VQAItem], images_dir: str | Path) -> Path:
    """LLaVA-Med's converted test.json: a conversation per question with ``answer_type``."""
    path, images_dir = Path(path), Path(images_dir)
    records = []
    for n, item in enumerate(items):
        _save(item.image, images_dir / f"{item.image_name}.jpg")
        records.append({"id": str(n), "image": f"{images_dir.name}/{item.image_name}.jpg",
                        "answer_type": item.answer_type,
                        "conversations": [{"from": "human", "value": f"<image>\n{item.question}"},
                                          {"from": "gpt", "value": item.answer}]})
    path.write_text(json.dumps(records, indent=1))
    return path
