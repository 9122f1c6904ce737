"""``medvlm eval``: evaluate a checkpoint on a VQA split, compare runs, re-score files, check leakage."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    evaluate = sub.add_parser("eval", help="evaluate on a VQA split; `eval score` re-scores files; `eval leakage`",
                              description="medvlm eval --model CKPT --dataset slake --root DIR | "
                                          "medvlm eval --compare RUN_A RUN_B | medvlm eval score --pred P --gt G | "
                                          "medvlm eval leakage --dataset vqa-rad --root DIR")
    evaluate.add_argument("action", nargs="?", choices=["score", "leakage"], help="score: re-score prediction files")
    evaluate.add_argument("--model", help="checkpoint folder")
    evaluate.add_argument("--dataset", choices=["vqa-rad", "slake", "pathvqa"])
    evaluate.add_argument("--root", help="data set folder or LLaVA-Med JSON")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--lang", default="en")
    evaluate.add_argument("--out", help="output folder (default: runs/eval-DATASET-SPLIT)")
    evaluate.add_argument("--suite", action="append", choices=["llava_med", "llava_med_2023", "strict"])
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--max-new-tokens", type=int, default=32)
    evaluate.add_argument("--closed-mode", choices=["generate", "likelihood"], default="generate")
    evaluate.add_argument("--option-suffix", action="store_true", help="add LLaVA-Med's yes/no option suffix to closed questions")
    evaluate.add_argument("--feature-cache", help="folder to keep vision features in across evaluations")
    evaluate.add_argument("--candidates", help="LLaVA-Med candidate file {\"0\": [...]} for open accuracy")
    evaluate.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="compare two eval outputs")
    evaluate.add_argument("--pred", help="(score) predictions: LLaVA-Med answer file or medvlm answers.jsonl")
    evaluate.add_argument("--gt", help="(score) ground truth: LLaVA-Med test JSON or medvlm answers.jsonl")
    evaluate.add_argument("--json", action="store_true", help="(score) print one JSON object")
    evaluate.add_argument("--pairs", help="(leakage) a pmc_ingest pairs folder to check against the test split")
    evaluate.set_defaults(handler=run_eval)


def run_eval(args) -> int:
    from downstream import evaluate as ev
    from downstream.metrics import SUITES, format_table

    suites = args.suite or list(SUITES)
    if args.action == "score":
        if not (args.pred and args.gt):
            raise SystemExit("medvlm eval score needs --pred and --gt")
        result = ev.score_files(args.pred, args.gt, args.candidates, suites)
        print(json.dumps(result) if args.json else format_table(result, suites))
        return 0
    if args.action == "leakage":
        return run_leakage(args)
    if args.compare:
        print(ev.format_comparison(ev.compare_runs(*args.compare, suites=suites)))
        return 0
    if not (args.model and args.dataset and args.root):
        raise SystemExit("medvlm eval needs --model, --dataset and --root (or --compare, or the score action)")
    from downstream.datasets import load_vqa
    from medvlm.model import load_checkpoint

    records, report = load_vqa(args.dataset, args.root, args.split, args.lang)
    candidates = None
    if args.candidates:
        data = json.loads(open(args.candidates, encoding="utf-8").read())
        candidates = data["0"] if isinstance(data, dict) else data
    out = args.out or f"runs/eval-{args.dataset}-{args.split}"
    result = ev.evaluate_model(load_checkpoint(args.model), records, out, suites, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, closed_mode=args.closed_mode,
                               option_suffix=args.option_suffix, candidates=candidates,
                               feature_cache_dir=args.feature_cache)
    print(format_table(result, suites))
    if report.skipped:
        print(f"skipped: {dict(report.skipped)}")
    print(f"answers: {out}/answers.jsonl\nmetrics: {out}/metrics.json\nreport: {out}/report.md")
    return 0


def run_leakage(args) -> int:
    from downstream.datasets import load_vqa
    from downstream.leakage import leakage_report

    test, _ = load_vqa(args.dataset, args.root, "test", args.lang)
    if args.pairs:
        from pmc_ingest.pairs import load_pairs

        train_images = [str(Path(args.pairs) / p) for p in load_pairs(args.pairs)["image_path"]]
        against = f"pairs table {args.pairs}"
    else:
        train, _ = load_vqa(args.dataset, args.root, "train", args.lang)
        train_images, against = [r.image for r in train], "its train split"
    report = leakage_report(train_images, [r.image for r in test])
    print(f"{args.dataset} test split vs {against}: {report['test_images']} test images, "
          f"{report['exact_duplicates']} exact and {report['near_duplicates']} near duplicates")
    for pair in (report["exact"] + report["near"])[:20]:
        print(f"  {pair['test']}  ==  {pair['train']}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"report: {args.out}")
    return 0
