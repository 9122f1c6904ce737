"""The ``medvlm`` command. Thin: parse arguments, call library code, print where outputs went."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    from medvlm.config import ConfigError
    from medvlm.data import DataError
    from medvlm.imaging import ImageLoadError

    try:
        return int(args.handler(args) or 0)
    except (ConfigError, DataError, ImageLoadError, FileNotFoundError) as exc:
        print(f"medvlm: error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medvlm", description="LLaVA-style vision-language models for biomedicine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    train = sub.add_parser("train", help="run one training stage from a stage YAML")
    train.add_argument("config", help="stage YAML (see medvlm/config.py StageConfig for every key)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set lr=1e-4 --set lora.r=16 (repeatable)")
    train.set_defaults(handler=_train)

    chat = sub.add_parser("chat", help="ask a model a question about an image (PNG/JPEG/DICOM)")
    chat.add_argument("question")
    chat.add_argument("--model", required=True, help="a checkpoint folder (e.g. a stage's checkpoint/)")
    chat.add_argument("--image", help="image file; DICOM is read with pydicom")
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--template", default=None, help="override the prompt template the model was trained with")
    chat.set_defaults(handler=_chat)

    ingest = sub.add_parser("ingest", help="PubMed Central OA packages → pairs → training data")
    ingest_sub = ingest.add_subparsers(title="ingest commands", metavar="STEP")
    pmc = ingest_sub.add_parser("pmc", help="PMC OA packages (.tar.gz / folders / .nxml) → figure-caption pairs")
    pmc.add_argument("inputs", nargs="+", help="packages, article folders, or folders holding many of either")
    pmc.add_argument("--out", required=True, help="output folder: pairs-*.parquet, images/, report.json")
    pmc.add_argument("--oa-file-list", help="PMC's oa_file_list.csv: keep only listed articles, take their licenses")
    pmc.add_argument("--license", dest="licenses", action="append",
                     help="allowed license (repeatable), e.g. --license 'CC BY' --license CC0")
    pmc.add_argument("--num-proc", type=int, default=1, help="parser processes")
    pmc.add_argument("--shard", help="i/n: process every n-th article starting at i (cluster array jobs)")
    pmc.add_argument("--min-caption-chars", type=int, default=20)
    pmc.add_argument("--max-caption-chars", type=int, default=4000)
    pmc.add_argument("--min-image-side", type=int, default=64)
    pmc.add_argument("--rows-per-shard", type=int, default=10_000)
    pmc.set_defaults(handler=_ingest_pmc)
    align = ingest_sub.add_parser("alignment", help="pairs → stage-1 concept-alignment conversations (LLaVA JSON)")
    align.add_argument("--pairs", required=True, help="the folder `medvlm ingest pmc` wrote")
    align.add_argument("--out", required=True, help="output JSON file")
    align.add_argument("--modality", action="append", help="keep only this modality tag (repeatable), e.g. CT")
    align.add_argument("--prompts", help="file of brief-description instructions, one per line")
    align.add_argument("--seed", type=int, default=0)
    align.add_argument("--limit", type=int)
    align.set_defaults(handler=_ingest_alignment)

    demo = sub.add_parser("demo", help="the embedded default: train the tiny model on real DICOM images, on CPU")
    demo.add_argument("--out", default="demo_runs/demo", help="run directory (default: demo_runs/demo)")
    demo.set_defaults(handler=_demo)
    return parser


def _train(args) -> int:
    from medvlm.config import load_stage
    from medvlm.trainer import train_stage

    config = load_stage(args.config, args.overrides)
    result = train_stage(config)
    if result.interrupted:
        print(f"interrupted; resume state in {result.checkpoint}. Run the same command again to resume.")
        return 3
    print(f"checkpoint: {result.checkpoint}\nlog: {result.output_dir / 'log.jsonl'}\nmetrics: {result.output_dir / 'metrics.json'}")
    return 0


def _chat(args) -> int:
    from medvlm.generate import generate_answers
    from medvlm.model import load_checkpoint

    bundle = load_checkpoint(args.model)
    answer = generate_answers(bundle, [args.question], [args.image], max_new_tokens=args.max_new_tokens,
                              template=args.template)[0]
    print(answer)
    return 0


def _ingest_pmc(args) -> int:
    from pmc_ingest.pairs import IngestOptions, ingest_pmc

    options = IngestOptions(min_caption_chars=args.min_caption_chars, max_caption_chars=args.max_caption_chars,
                            min_image_side=args.min_image_side, licenses=args.licenses, num_proc=args.num_proc,
                            shard=args.shard, oa_file_list=args.oa_file_list, rows_per_shard=args.rows_per_shard)
    report = ingest_pmc(args.inputs, args.out, options)
    print(report.summary())
    print(f"pairs: {args.out}/pairs-*.parquet ({len(report.shards)} shard(s)); images: {args.out}/images; "
          f"report: {args.out}/report*.json")
    return 0


def _ingest_alignment(args) -> int:
    from pmc_ingest.alignment import write_alignment

    count = write_alignment(args.pairs, args.out, seed=args.seed, modalities=args.modality,
                            prompts_file=args.prompts, limit=args.limit)
    print(f"{count} alignment conversations written to {args.out} (image paths relative to {args.pairs})")
    return 0


def _demo(args) -> int:
    from curricula.demo import run_demo

    run_demo(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
