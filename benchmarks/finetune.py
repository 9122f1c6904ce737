"""Downstream finetune speed: medvlm's trainer, with and without shared-image packing, vs the reference recipe,
in one process, alternating runs.

The reference recipe is what LLaVA's ``train.py`` and TRL do: ``transformers.Trainer`` on the same
``LlavaForConditionalGeneration`` (same initial weights, same frozen vision tower), the same conversations,
batch size, epochs, AdamW learning rate, cosine schedule and precision, with a dataset that loads and
preprocesses each image on every access, a plain padding collator and a random sampler.
medvlm runs its own trainer with its defaults (frozen-feature cache, LM head and loss at answer positions
only, length-grouped batches when they pay), once with ``pack_by_image: false`` and once with ``true``
(the questions about one image share one prefix: ``medvlm/packing.py``).

Data (``benchmarks/common.py``): a VQA set with the real sets' questions per image (VQA-RAD's by default,
``--like slake|pathvqa``), questions and answers as long as theirs, JPEG images (``--format dicom``: DICOM
files decoded on every read). Model shapes: *proportioned* — CLIP-L/336's 576 image tokens and its
vision : LM parameter ratio to a 7B LM (≈ 1 : 23), at narrow widths — and optionally the ``tiny`` preset.

    python benchmarks/finetune.py [--quick] [--like vqa-rad] [--format jpeg] [--images 24] [--epochs 3]

Prints samples/s of each run, the trained model's loss over the whole training set (same for every
recipe, up to noise: the check that the runs did the same work), FLOPs utilisation (the FLOPs each recipe
performs, see ``flops_per_sample``) against a torch.mm peak measured here, and, last, the speed ratios
(medvlm ÷ reference) per shape, packed and unpacked.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import LIKE, parameter_split, proportioned_bundle, write_vqa_set  # noqa: E402
from benchmarks.flops import matmul_peak_flops  # noqa: E402
from downstream.finetune import prepare_finetune_data  # noqa: E402
from medvlm.config import DataSource, StageConfig  # noqa: E402
from medvlm.conversation import IGNORE_INDEX, encode  # noqa: E402
from medvlm.data import ConversationDataset, ImageGroupedBatchSampler, preprocess_image, read_records  # noqa: E402
from medvlm.generate import shared_prefix_length  # noqa: E402
from medvlm.imaging import load_image  # noqa: E402
from medvlm.model import apply_trainable, build_tiny  # noqa: E402
from medvlm.packing import PackedCollator, packed_loss  # noqa: E402
from medvlm.trainer import Trainer  # noqa: E402

BATCH, LR = 8, 5e-4
RECIPES = ("reference", "medvlm", "medvlm packed")


class ReferenceDataset(torch.utils.data.Dataset):
    """LLaVA's LazySupervisedDataset in spirit: read, preprocess and tokenize on every access."""

    def __init__(self, records, image_root: Path, bundle):
        self.records, self.image_root, self.bundle = records, image_root, bundle

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        record, b = self.records[i], self.bundle
        pixels = preprocess_image(load_image(self.image_root / record["image"]), b.image_processor, "pad")
        enc = encode(b.template, record["conversations"], b.tokenizer, b.image_token_id, b.num_image_tokens, True)
        return {"input_ids": torch.tensor(enc.input_ids), "labels": torch.tensor(enc.labels), "pixel_values": pixels}


def pad_collator(pad_id: int):
    def collate(items):
        ids = torch.nn.utils.rnn.pad_sequence([i["input_ids"] for i in items], batch_first=True, padding_value=pad_id)
        labels = torch.nn.utils.rnn.pad_sequence([i["labels"] for i in items], batch_first=True, padding_value=IGNORE_INDEX)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(i["input_ids"]) for i in items], batch_first=True)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "pixel_values": torch.stack([i["pixel_values"] for i in items])}
    return collate


def run_reference(bundle, data: Path, image_root: Path, epochs: int, out: Path) -> dict:
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments

    bundle = apply_trainable(bundle, "projector+llm")
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=epochs,
                             learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0,
                             max_grad_norm=1.0, logging_steps=5, save_strategy="no", report_to=[], seed=0,
                             dataloader_num_workers=0, remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
                             bf16=torch.cuda.is_available(), disable_tqdm=True)
    trainer = HFTrainer(model=bundle.model, args=args, train_dataset=ReferenceDataset(read_records(data), image_root, bundle),
                        data_collator=pad_collator(bundle.tokenizer.pad_token_id))
    metrics = trainer.train().metrics
    return {"samples_per_second": metrics["train_samples_per_second"], "bundle": bundle}


def run_medvlm(bundle, data: Path, image_root: Path, epochs: int, out: Path, packed: bool) -> dict:
    config = StageConfig(name="bench", trainable="projector+llm", data=[DataSource(str(data), str(image_root))],
                         output_dir=str(out), epochs=epochs, batch_size=BATCH, lr=LR, log_steps=5, template="llava_v1",
                         pack_by_image=packed)
    result = Trainer(config, bundle).run()
    return {"samples_per_second": result.metrics["samples_per_second"], "bundle": bundle}


@torch.no_grad()
def full_pass_loss(bundle, data: Path, image_root: Path) -> float:
    """Mean loss of the trained model over the whole training set (the fair comparison: a last-window training
    loss depends on which records the last batches held). Computed packed, which is exact (tests/test_packing.py)."""
    model = bundle.model.eval()
    dataset = ConversationDataset([DataSource(str(data), str(image_root))], bundle, bundle.template)
    collate = PackedCollator(bundle.tokenizer.pad_token_id, bundle.image_token_id)
    total = tokens = 0.0
    for indices in ImageGroupedBatchSampler([str(e.image_path) for e in dataset.examples], 32):
        batch = collate(dataset.__getitems__(indices))
        n = batch["loss_targets"].numel()
        total += float(packed_loss(model, batch, {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"]})) * n
        tokens += n
    return total / tokens


def flops_per_sample(bundle, data: Path, epochs: int) -> dict[str, float]:
    """Training FLOPs each recipe performs per sample: 2 × parameters per token forward, 4 × backward, the
    frozen vision tower forward only. The reference runs the tower on every sample and the LM head at every
    position; medvlm runs the tower once per distinct image (feature cache) and the head at answer positions
    only; packed, the LM runs each batch's shared prefix once per image in the batch (the sampler's batches)."""
    vision, projector, lm = parameter_split(bundle.model)
    head = bundle.model.lm_head.weight.numel()
    records = read_records(data)
    encoded = [encode(bundle.template, r["conversations"], bundle.tokenizer, bundle.image_token_id,
                      bundle.num_image_tokens, True) for r in records]
    tokens = sum(len(e.input_ids) for e in encoded) / len(encoded)
    answer_tokens = sum(sum(label != IGNORE_INDEX for label in e.labels) for e in encoded) / len(encoded)
    packed_tokens = 0
    for batch in ImageGroupedBatchSampler([r["image"] for r in records], BATCH):
        by_image: dict = {}
        for i in batch:
            by_image.setdefault(records[i]["image"], []).append(encoded[i].input_ids)
        for rows in by_image.values():
            prefix = (shared_prefix_length(rows, bundle.image_token_id) or 0) if len(rows) > 1 else 0
            packed_tokens += prefix + sum(len(row) - prefix for row in rows)
    tower = 2 * vision * (bundle.num_image_tokens + 1)
    cached_tower = tower * len({r["image"] for r in records}) / (len(records) * epochs)
    return {"reference": tower + 6 * (projector + lm) * tokens,
            "medvlm": cached_tower + 6 * (projector + lm - head) * tokens + 6 * head * answer_tokens,
            "medvlm packed": cached_tower + 6 * (projector + lm - head) * packed_tokens / len(records)
            + 6 * head * answer_tokens}


def bench_shape(shape: str, template, data: Path, image_root: Path, args, peak: float, tmp: Path) -> dict:
    vision, projector, lm = parameter_split(template.model)
    per_sample = flops_per_sample(template, data, args.epochs)
    print(f"\n[{shape}] vision {vision:,} / projector {projector:,} / LM {lm:,} parameters "
          f"(vision : LM = 1 : {lm / vision:.1f}), {template.num_image_tokens} image tokens")
    results = {name: [] for name in RECIPES}
    for round_ in range(args.rounds):
        for name in RECIPES:
            bundle, out = copy.deepcopy(template), tmp / f"{shape}-{name.replace(' ', '-')}-{round_}"
            if name == "reference":
                r = run_reference(bundle, data, image_root, args.epochs, out)
            else:
                r = run_medvlm(bundle, data, image_root, args.epochs, out, packed=name.endswith("packed"))
            r["final_loss"] = full_pass_loss(r.pop("bundle"), data, image_root)
            results[name].append(r)
            print(f"  round {round_ + 1} {name:<13}: {r['samples_per_second']:7.2f} samples/s, loss after (full pass) "
                  f"{r['final_loss']:.4f}, MFU {100 * per_sample[name] * r['samples_per_second'] / peak:.2f}%", flush=True)
    speed = {k: statistics.median(r["samples_per_second"] for r in v) for k, v in results.items()}
    print("  median samples/s: " + ", ".join(f"{k} {v:.2f}" for k, v in speed.items()))
    return {"packed": speed["medvlm packed"] / speed["reference"], "unpacked": speed["medvlm"] / speed["reference"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a few minutes on 2 cores: 8 images, 1 epoch, 2 rounds")
    parser.add_argument("--like", choices=sorted(LIKE), default="vqa-rad", help="whose questions-per-image to copy")
    parser.add_argument("--format", choices=("jpeg", "dicom"), default="jpeg")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=3, help="LLaVA-Med finetunes for 9")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 gives steadier numbers on a machine shared with other jobs")
    parser.add_argument("--shapes", nargs="+", choices=("proportioned", "tiny"), default=["proportioned", "tiny"])
    args = parser.parse_args()
    if args.quick:
        args.images, args.epochs, args.rounds, args.shapes = 8, 1, 2, ["proportioned"]
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    torch.manual_seed(0)
    peak = matmul_peak_flops(torch.float32)
    print(f"matmul peak (fp32, measured): {peak / 1e9:.1f} GFLOP/s; torch threads {torch.get_num_threads()}")
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = write_vqa_set(tmp / "vqa", like=args.like, images=args.images, image_format=args.format)
        data, image_root, info = prepare_finetune_data("vqa-rad", root, tmp / "data")
        records = read_records(data)
        per_image = len(records) / len({r["image"] for r in records})
        print(f"data like {args.like}: {info['questions']} training questions on {args.images} {args.format.upper()} "
              f"images ({per_image:.1f} per image; {args.like} has {LIKE[args.like].per_image:.1f}); "
              f"batch {BATCH}, {args.epochs} epoch(s)")
        for shape in args.shapes:
            template = build_tiny() if shape == "tiny" else proportioned_bundle()[0]
            ratios[shape] = bench_shape(shape, template, data, image_root, args, peak, tmp)
    print(f"total {time.perf_counter() - started:.0f} s")
    print(json.dumps({k: {m: round(v, 2) for m, v in r.items()} for k, r in ratios.items()}))
    print("finetune speed ratio medvlm/reference: " + ", ".join(
        f"{k} packed {r['packed']:.2f}x, unpacked {r['unpacked']:.2f}x" for k, r in ratios.items()))


if __name__ == "__main__":
    main()
