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


def _demo(args) -> int:
    from curricula.demo import run_demo

    run_demo(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
