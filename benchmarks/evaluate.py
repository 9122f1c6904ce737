"""VQA evaluation speed: medvlm's batched greedy generation (batch 16, KV cache, per-sequence stop; each
distinct image decoded once, the next batch's images decoded on threads meanwhile; the prompt up to the
image prefilled once per image and shared by the questions about it) vs one question at a time as
LLaVA-Med's ``model_vqa`` does it (open the image, preprocess, generate with batch 1, for every
question), same model, same questions, in one process. The answers must be identical; the script fails
loudly if any differ. It also prints how long decoding the images takes, the part of the first pass that
no batching removes (the repeat pass reads vision features from the cache instead).

Data (``benchmarks/common.py``): the real sets' questions per image (VQA-RAD's by default, ``--like
slake|pathvqa``), JPEG images as the sets ship them (``--format dicom``: DICOM files), questions and answers
as long as theirs. The model has CLIP-L/336's sequence shape (576 image tokens) and vision : LM parameter
ratio (1 : 23) at narrow widths, finetuned for a few epochs on the set's training questions (packed) so its
answers are short and end with end-of-sequence as a finetuned model's do.

    python benchmarks/evaluate.py [--quick] [--like vqa-rad] [--format jpeg] [--images 24] [--rounds 2]

The last line is the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import LIKE, parameter_split, proportioned_bundle, write_vqa_set  # noqa: E402
from benchmarks.flops import matmul_peak_flops  # noqa: E402
from downstream.datasets import load_vqa  # noqa: E402
from downstream.finetune import finetune  # noqa: E402
from medvlm.data import preprocess_image  # noqa: E402
from medvlm.features import FeatureCache  # noqa: E402
from medvlm.generate import _stop_ids, generate_answers, prompt_ids, shared_prefix_length  # noqa: E402
from medvlm.imaging import load_image  # noqa: E402
from medvlm.model import load_checkpoint, save_folder  # noqa: E402


@torch.no_grad()
def one_at_a_time(bundle, questions, images, max_new_tokens: int) -> list[str]:
    """LLaVA-Med's ``model_vqa`` loop: for each question, open and preprocess its image, build the prompt,
    generate with batch size 1."""
    model = bundle.model.eval()
    answers = []
    stop = _stop_ids(bundle)
    for question, image in zip(questions, images):
        pixels = preprocess_image(load_image(image), bundle.image_processor, "pad").unsqueeze(0)
        ids = torch.tensor([prompt_ids(bundle, question, True)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stop,
                             pad_token_id=bundle.tokenizer.pad_token_id, use_cache=True)
        answers.append(bundle.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a few minutes on 2 cores: 8 images, 3 rounds")
    parser.add_argument("--like", choices=sorted(LIKE), default="vqa-rad", help="whose questions-per-image to copy")
    parser.add_argument("--format", choices=("jpeg", "dicom"), default="jpeg")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 gives steadier numbers on a machine shared with other jobs")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    if args.quick:
        args.images, args.rounds = 8, 3   # medians of 3: one busy spell on a shared machine decides less
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    peak = matmul_peak_flops(torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = write_vqa_set(tmp / "vqa", like=args.like, images=args.images, image_format=args.format)
        save_folder(proportioned_bundle()[0], tmp / "base")
        result = finetune("vqa-rad", root, {"checkpoint": str(tmp / "base")}, tmp / "ft",
                          ["epochs=8", "lr=1e-3", "batch_size=8", "grad_accum=1", "log_steps=50", "pack_by_image=true"])
        bundle = load_checkpoint(result.checkpoint)
        records = load_vqa("vqa-rad", root, "test")[0] + load_vqa("vqa-rad", root, "train")[0]
        questions, images = [r.question for r in records], [r.image for r in records]
        vision, projector, lm = parameter_split(bundle.model)
        prompts = [prompt_ids(bundle, q, True) for q in questions]
        prompt_tokens = sum(len(p) for p in prompts)
        image_paths = sorted({str(i) for i in images})
        timings = {"one at a time": [], "batched (16)": []}
        answers = {}
        # warm-up, not timed (first calls allocate and pick kernels): a few questions through each method; nothing
        # carries over into the timed calls (no feature cache), so the first pass still decodes every image
        one_at_a_time(bundle, questions[:2], images[:2], args.max_new_tokens)
        generate_answers(bundle, questions[:16], images[:16], max_new_tokens=args.max_new_tokens, batch_size=16)
        for _ in range(args.rounds):
            start = time.perf_counter()
            answers["one at a time"] = one_at_a_time(bundle, questions, images, args.max_new_tokens)
            timings["one at a time"].append(time.perf_counter() - start)
            start = time.perf_counter()
            answers["batched (16)"] = generate_answers(bundle, questions, images, max_new_tokens=args.max_new_tokens,
                                                       batch_size=16)
            timings["batched (16)"].append(time.perf_counter() - start)
        # repeated evaluation (another checkpoint with the same frozen tower): features from a disk cache
        cache = FeatureCache(bundle.model, bundle.image_processor, "pad", tmp / "features")
        generate_answers(bundle, questions, images, max_new_tokens=args.max_new_tokens, batch_size=16,
                         feature_cache=cache)
        timings["batched, repeat"] = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            answers["batched, repeat"] = generate_answers(bundle, questions, images, max_new_tokens=args.max_new_tokens,
                                                          batch_size=16, feature_cache=FeatureCache(
                                                              bundle.model, bundle.image_processor, "pad", tmp / "features"))
            timings["batched, repeat"].append(time.perf_counter() - start)
        generated = sum(len(bundle.tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers["batched (16)"])
        # FLOPs each method performs: one at a time runs the tower and the whole prompt per question; batched
        # runs the tower and the shared prefix (system prompt + image) once per distinct image, the question
        # tokens per question; the repeat takes the tower's features from the cache.
        distinct = len(image_paths)
        prefix = shared_prefix_length(prompts, bundle.model.config.image_token_id)
        tower_flops = 2 * vision * (bundle.num_image_tokens + 1)
        shared_lm_tokens = distinct * prefix + prompt_tokens - len(questions) * prefix + generated
        flops = {"one at a time": tower_flops * len(questions) + 2 * (projector + lm) * (prompt_tokens + generated),
                 "batched (16)": tower_flops * distinct + 2 * (projector + lm) * shared_lm_tokens,
                 "batched, repeat": 2 * (projector + lm) * shared_lm_tokens}
        start = time.perf_counter()
        for path in image_paths:
            preprocess_image(load_image(path), bundle.image_processor, "pad")
        decode_seconds = time.perf_counter() - start
        print(f"{len(questions)} questions like {args.like}'s on {distinct} {args.format.upper()} images "
              f"({len(questions) / distinct:.1f} per image), {bundle.num_image_tokens} image tokens, greedy, "
              f"max {args.max_new_tokens} new tokens")
        print(f"decoding + preprocessing the {distinct} distinct images once takes {decode_seconds:.2f} s on one thread "
              f"(one at a time does it for all {len(questions)} questions)")
        peak = max(peak, matmul_peak_flops(torch.float32))  # on a shared machine one measurement may land in a busy spell
        rates = {}
        for name, values in timings.items():
            seconds = statistics.median(values)
            rates[name] = len(questions) / seconds
            print(f"{name:<14}: {rates[name]:7.2f} questions/s, MFU {100 * flops[name] / seconds / peak:.2f}% "
                  f"(peak {peak / 1e9:.0f} GFLOP/s measured)")
        for name in ("batched (16)", "batched, repeat"):
            differing = [i for i, (a, b) in enumerate(zip(answers["one at a time"], answers[name])) if a != b]
            if differing:
                raise SystemExit(f"{name}: answers differ for {len(differing)} questions, e.g. #{differing[0]}: "
                                 f"{answers['one at a time'][differing[0]]!r} vs {answers[name][differing[0]]!r}")
        print(f"identical answers: {len(questions)}/{len(questions)} (batched and repeat vs one at a time); "
              f"{generated / len(questions):.1f} tokens generated per answer on average (at most {args.max_new_tokens}), "
              f"e.g. {answers['batched (16)'][:3]}")
        print(f"total {time.perf_counter() - started:.0f} s")
        print(f"repeated evaluation with cached vision features vs one-at-a-time: "
              f"{rates['batched, repeat'] / rates['one at a time']:.2f}x")
        print(f"evaluation speed ratio batched/one-at-a-time (first pass): "
              f"{rates['batched (16)'] / rates['one at a time']:.2f}x")


if __name__ == "__main__":
    main()
