"""``medvlm demo``: the embedded default run (tiny model, real DICOM images, CPU)."""

from __future__ import annotations


def register(sub) -> None:
    demo = sub.add_parser("demo", help="the embedded default: train the tiny model on real DICOM images, on CPU")
    demo.add_argument("--out", help="run directory (default: demo_runs/demo or demo_runs/ablation)")
    demo.add_argument("--ablation", action="store_true", help="run the ablation sweep and print its table")
    demo.set_defaults(handler=run_demo)


def run_demo(args) -> int:
    from curricula.demo import run_demo as demo

    demo(args.out or ("demo_runs/ablation" if args.ablation else "demo_runs/demo"), ablation=args.ablation)
    return 0
