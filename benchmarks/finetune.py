"""Downstream finetune speed: medvlm's trainer vs the reference recipe, in one process, alternating runs.

The reference recipe is what LLaVA's ``train.py`` and TRL do: ``transformers.Trainer`` on the same
``LlavaForConditionalGeneration`` (same initial weights, same frozen vision tower), the same conversations,
batch size, epochs, AdamW learning rate, cosine schedule and precision, with a dataset that loads and
preprocesses each image on every access, a plain padding collator and a random sampler.
medvlm runs its own trainer with its defaults: frozen-feature cache, LM head and loss at answer positions
only, length-grouped batches when they pay.

Data: a VQA-RAD-layout set whose images are real DICOM files (pydicom's and pydicom-data's CT, MR, CR and
US, up to 1955 px), decoded by pydicom on every read. Two model shapes: the ``tiny`` preset, and a
*proportioned* one whose vision : LM parameter ratio is CLIP-L/336 : 7B (≈ 1 : 23).

    python benchmarks/finetune.py [--epochs 3] [--rounds 2] [--shapes tiny proportioned]

Prints samples/s of each run, final losses, FLOPs utilisation (the FLOPs each recipe performs, see
``flops_per_sample``) against a torch.mm peak measured here, and, last, the speed ratio (medvlm ÷
reference) per shape.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import parameter_split, proportioned_bundle, write_dicom_vqa_rad  # noqa: E402
from benchmarks.flops import matmul_peak_flops  # noqa: E402
from downstream.finetune import prepare_finetune_data  # noqa: E402
from medvlm.config import DataSource, StageConfig  # noqa: E402
from medvlm.conversation import IGNORE_INDEX, encode  # noqa: E402
from medvlm.data import preprocess_image, read_records  # noqa: E402
from medvlm.imaging import load_image  # noqa: E402
from medvlm.model import apply_trainable, build_tiny  # noqa: E402
from medvlm.trainer import Trainer  # noqa: E402

BATCH, LR = 8, 5e-4


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


def run_reference(make_bundle, data: Path, image_root: Path, epochs: int, out: Path) -> dict:
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments

    bundle = apply_trainable(make_bundle(), "projector+llm")
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=epochs,
                             learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0,
                             max_grad_norm=1.0, logging_steps=5, save_strategy="no", report_to=[], seed=0,
                             dataloader_num_workers=0, remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
                             bf16=torch.cuda.is_available(), disable_tqdm=True)
    trainer = HFTrainer(model=bundle.model, args=args, train_dataset=ReferenceDataset(read_records(data), image_root, bundle),
                        data_collator=pad_collator(bundle.tokenizer.pad_token_id))
    metrics = trainer.train().metrics
    return {"samples_per_second": metrics["train_samples_per_second"], "final_loss": full_pass_loss(bundle, data, image_root)}


def run_medvlm(make_bundle, data: Path, image_root: Path, epochs: int, out: Path) -> dict:
    config = StageConfig(name="bench", trainable="projector+llm", data=[DataSource(str(data), str(image_root))],
                         output_dir=str(out), epochs=epochs, batch_size=BATCH, lr=LR, log_steps=5, template="llava_v1")
    bundle = make_bundle()
    result = Trainer(config, bundle).run()
    return {"samples_per_second": result.metrics["samples_per_second"], "final_loss": full_pass_loss(bundle, data, image_root)}


@torch.no_grad()
def full_pass_loss(bundle, data: Path, image_root: Path) -> float:
    """Mean loss of the trained model over the whole training set, in a fixed order (the fair comparison:
    a last-window training loss depends on which records the last batches held)."""
    model = bundle.model.eval()
    dataset = ReferenceDataset(read_records(data), image_root, bundle)
    collate = pad_collator(bundle.tokenizer.pad_token_id)
    losses, weights = [], []
    for start in range(0, len(dataset), BATCH):
        batch = collate([dataset[i] for i in range(start, min(start + BATCH, len(dataset)))])
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        losses.append(float(model(**batch).loss) * tokens)
        weights.append(tokens)
    return sum(losses) / sum(weights)


def flops_per_sample(bundle, data: Path, epochs: int) -> dict[str, float]:
    """Training FLOPs each recipe performs per sample: 2 × parameters per token forward, 4 × backward, the
    frozen vision tower forward only. The reference runs the tower on every sample and the LM head at every
    position; medvlm runs the tower once per distinct image (feature cache) and the head at answer
    positions only (``answer_logits_only``)."""
    vision, projector, lm = parameter_split(bundle.model)
    head = bundle.model.lm_head.weight.numel()
    records = read_records(data)
    encoded = [encode(bundle.template, r["conversations"], bundle.tokenizer, bundle.image_token_id,
                      bundle.num_image_tokens, True) for r in records]
    tokens = sum(len(e.input_ids) for e in encoded) / len(encoded)
    answer_tokens = sum(sum(label != IGNORE_INDEX for label in e.labels) for e in encoded) / len(encoded)
    tower = 2 * vision * (bundle.num_image_tokens + 1)
    distinct_images = len({r["image"] for r in records})
    return {"reference": tower + 6 * (projector + lm) * tokens,
            "medvlm": (tower * distinct_images / (len(records) * epochs) + 6 * (projector + lm - head) * tokens
                       + 6 * head * answer_tokens)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=9, help="LLaVA-Med finetunes for 9")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "proportioned"])
    args = parser.parse_args()
    torch.manual_seed(0)
    peak = matmul_peak_flops(torch.float32)
    print(f"matmul peak (fp32, measured): {peak / 1e9:.1f} GFLOP/s")
    makers = {"tiny": build_tiny, "proportioned": lambda: proportioned_bundle()[0]}
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = write_dicom_vqa_rad(tmp / "vqa_rad")
        data, image_root, info = prepare_finetune_data("vqa-rad", root, tmp / "data")
        print(f"data: {info['questions']} training questions on real DICOM images; batch {BATCH}, {args.epochs} epochs")
        for shape in args.shapes:
            make = makers[shape]
            sample = make()
            vision, projector, lm = parameter_split(sample.model)
            per_sample = flops_per_sample(sample, data, args.epochs)
            print(f"\n[{shape}] vision {vision:,} / projector {projector:,} / LM {lm:,} parameters "
                  f"(vision : LM = 1 : {lm / vision:.1f})")
            results = {"reference": [], "medvlm": []}
            for round_ in range(args.rounds):
                for name, runner in (("reference", run_reference), ("medvlm", run_medvlm)):
                    r = runner(make, data, image_root, args.epochs, tmp / f"{shape}-{name}-{round_}")
                    results[name].append(r)
                    print(f"  round {round_ + 1} {name:<9}: {r['samples_per_second']:7.2f} samples/s, "
                          f"loss after (full pass) {r['final_loss']:.4f}, MFU {100 * per_sample[name] * r['samples_per_second'] / peak:.2f}%")
            speed = {k: statistics.median(r["samples_per_second"] for r in v) for k, v in results.items()}
            ratios[shape] = speed["medvlm"] / speed["reference"]
            print(f"  median samples/s: reference {speed['reference']:.2f}, medvlm {speed['medvlm']:.2f}")
    print(json.dumps({k: round(v, 2) for k, v in ratios.items()}))
    print("finetune speed ratio medvlm/reference: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
