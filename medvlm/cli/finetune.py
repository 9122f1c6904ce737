"""``medvlm finetune``: finetune a checkpoint on one downstream VQA data set."""

from __future__ import annotations

from medvlm.cli.options import add_overrides


def register(sub) -> None:
    from downstream.datasets import DATASETS
    from downstream.protocols import protocol_names

    finetune = sub.add_parser("finetune", help="finetune on VQA-RAD / SLAKE / PathVQA (9 epochs by default)")
    finetune.add_argument("--dataset", required=True, choices=DATASETS)
    finetune.add_argument("--root", required=True, help="the data set's folder (any supported layout) or a LLaVA-Med JSON")
    finetune.add_argument("--model", required=True, help="checkpoint folder to start from")
    finetune.add_argument("--out", help="output folder (default: runs/finetune-DATASET)")
    finetune.add_argument("--lang", default="en", help="SLAKE question language: en, zh or all")
    finetune.add_argument("--protocol", choices=protocol_names(), default="medvlm",
                          help="lay out training questions as this eval protocol poses them (image position, suffixes)")
    add_overrides(finetune, "stage setting, e.g. --set epochs=3 --set batch_size=8")
    finetune.set_defaults(handler=run_finetune)


def run_finetune(args) -> int:
    from downstream.finetune import finetune

    out = args.out or f"runs/finetune-{args.dataset}"
    result = finetune(args.dataset, args.root, {"checkpoint": args.model}, out, args.overrides,
                      base={"protocol": args.protocol}, lang=args.lang)
    print(f"checkpoint: {result.checkpoint}\nlog: {result.output_dir / 'log.jsonl'}")
    return 0
