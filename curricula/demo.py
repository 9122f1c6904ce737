"""``medvlm demo``: the embedded default, on a laptop CPU with no downloads.

Renders real CT/MRI/X-ray/ultrasound DICOMs into a small image set, then runs the LLaVA recipe on the
``tiny`` preset: stage 1 (projector only, ``plain`` template, captions) → stage 2 (projector + LM,
``llava_v1``, question/answer turns), and asks the final model about held-out images.
"""

from __future__ import annotations

import time
from pathlib import Path

from medvlm.config import DataSource, StageConfig
from medvlm.generate import generate_answers
from medvlm.model import load_checkpoint
from medvlm.trainer import train_stage

from .demo_data import alignment_records, instruction_records, render_variants, write_json


def run_demo(out: str | Path) -> Path:
    out = Path(out)
    started = time.perf_counter()
    images_dir = out / "data" / "images"
    images = render_variants(images_dir)
    align = write_json(out / "data" / "alignment.json", alignment_records(images))
    instruct = write_json(out / "data" / "instruct.json", instruction_records(images))
    print(f"demo data: {len(images)} images from real DICOM files in {images_dir}")

    stage1 = StageConfig(name="align", model={"preset": "tiny"}, trainable="projector", template="plain",
                         data=[DataSource(str(align), str(images_dir))], output_dir=str(out / "align"),
                         epochs=3, batch_size=8, lr=1e-3, log_steps=5)
    first = train_stage(stage1)
    stage2 = StageConfig(name="instruct", model={"checkpoint": str(first.checkpoint)}, trainable="projector+llm",
                         template="llava_v1", data=[DataSource(str(instruct), str(images_dir))],
                         output_dir=str(out / "instruct"), epochs=12, batch_size=8, lr=1e-3, log_steps=10)
    second = train_stage(stage2)

    bundle = load_checkpoint(second.checkpoint)
    held_out = [img for img in images if img.held_out][::4]
    answers = generate_answers(bundle, ["What imaging modality was used for this image?"] * len(held_out),
                               [images_dir / img.file for img in held_out], max_new_tokens=24)
    print("\nheld-out images (never trained on):")
    for img, answer in zip(held_out, answers):
        print(f"  {img.file:<40} truth: {img.sample.modality:<11} model: {answer}")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s; final checkpoint: {second.checkpoint}")
    return second.checkpoint
