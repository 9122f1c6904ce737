"""The ``medvlm`` command. Thin: parse arguments, call library code, print where outputs went."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


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

    finetune = sub.add_parser("finetune", help="finetune on VQA-RAD / SLAKE / PathVQA (9 epochs by default)")
    finetune.add_argument("--dataset", required=True, choices=["vqa-rad", "slake", "pathvqa"])
    finetune.add_argument("--root", required=True, help="the data set's folder (any supported layout) or a LLaVA-Med JSON")
    finetune.add_argument("--model", required=True, help="checkpoint folder to start from")
    finetune.add_argument("--out", help="output folder (default: runs/finetune-DATASET)")
    finetune.add_argument("--lang", default="en", help="SLAKE question language: en, zh or all")
    finetune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="stage setting, e.g. --set epochs=3 --set batch_size=8")
    finetune.set_defaults(handler=_finetune)

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
    evaluate.set_defaults(handler=_eval)

    instruct = ingest_sub.add_parser("instruct", help="pairs → GPT-written instruction conversations (any OpenAI-compatible URL)")
    instruct.add_argument("--pairs", required=True, help="the folder `medvlm ingest pmc` wrote")
    instruct.add_argument("--out", required=True, help="output folder: instruct.json, cache.jsonl, summary.json")
    instruct.add_argument("--model", default="gpt-4o")
    instruct.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (default: OpenAI)")
    instruct.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    instruct.add_argument("--max-concurrency", type=int, default=8)
    instruct.add_argument("--max-retries", type=int, default=6)
    instruct.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    instruct.add_argument("--temperature", type=float, default=0.7)
    instruct.add_argument("--max-tokens", type=int, default=1024, help="completion tokens per request")
    instruct.add_argument("--no-mentions", dest="with_mentions", action="store_false",
                          help="leave the inline mentions out of the prompt (LLaVA-Med's 60K vs 60K-IM)")
    instruct.add_argument("--budget-usd", type=float, help="never send a request that could cross this spend")
    instruct.add_argument("--max-tokens-total", type=int, help="never send a request that could cross this many tokens")
    instruct.add_argument("--prices", dest="prices_file", help="USD per 1M tokens per model (default: prompts/prices.json)")
    instruct.add_argument("--modality", dest="modalities", action="append", help="only pairs with this modality tag")
    instruct.add_argument("--limit", type=int)
    instruct.add_argument("--sample", type=int, help="a seeded random sample of this many pairs")
    instruct.add_argument("--seed", type=int, default=0)
    instruct.add_argument("--system-prompt", dest="system_file", help="replace prompts/instruct_system.txt")
    instruct.add_argument("--fewshot", dest="fewshot_file", help="replace prompts/instruct_fewshot.jsonl")
    instruct.add_argument("--dry-run", action="store_true", help="write the prompts (prompts.jsonl) and a token estimate")
    instruct.set_defaults(handler=_ingest_instruct)

    demo = sub.add_parser("demo", help="the embedded default: train the tiny model on real DICOM images, on CPU")
    demo.add_argument("--out", help="run directory (default: demo_runs/demo or demo_runs/ablation)")
    demo.add_argument("--ablation", action="store_true", help="run the ablation sweep and print its table")
    demo.set_defaults(handler=_demo)

    curriculum = sub.add_parser("curriculum", help="run / plan / inspect a curriculum (the LLaVA-Med chain)")
    cur_sub = curriculum.add_subparsers(title="curriculum commands", metavar="ACTION")
    run = cur_sub.add_parser("run", help="run every stage in order (resumable)")
    run.add_argument("file", help="curriculum YAML (e.g. curricula/llava_med.yaml)")
    run.add_argument("--run-dir", help="run directory (default: runs/NAME)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a curriculum key, e.g. --set stages.4.epochs=3")
    run.add_argument("--only", metavar="STAGE", help="run only this stage (its parent must be finished)")
    run.add_argument("--from", dest="from_stage", metavar="STAGE", help="re-run from this stage on")
    run.add_argument("--resume", action="store_true", help="continue a crashed run (finished stages are skipped)")
    run.add_argument("--base-dir", help="folder that relative data paths are relative to (default: the YAML's folder)")
    run.set_defaults(handler=_curriculum_run)
    show = cur_sub.add_parser("show", help="print the plan without loading any weights")
    show.add_argument("file")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    show.add_argument("--base-dir")
    show.set_defaults(handler=_curriculum_show)
    status = cur_sub.add_parser("status", help="each stage's state and metrics")
    status.add_argument("run_dir")
    status.set_defaults(handler=_curriculum_status)
    report = cur_sub.add_parser("report", help="the ablation table (Markdown) and a bar chart PNG")
    report.add_argument("run_dir")
    report.add_argument("--suite", default="strict", choices=["llava_med", "llava_med_2023", "strict"])
    report.set_defaults(handler=_curriculum_report)
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


def _finetune(args) -> int:
    from downstream.finetune import finetune

    out = args.out or f"runs/finetune-{args.dataset}"
    result = finetune(args.dataset, args.root, {"checkpoint": args.model}, out, args.overrides, lang=args.lang)
    print(f"checkpoint: {result.checkpoint}\nlog: {result.output_dir / 'log.jsonl'}")
    return 0


def _eval(args) -> int:
    import json

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
        return _leakage(args)
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


def _leakage(args) -> int:
    import json

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


def _ingest_instruct(args) -> int:
    import dataclasses

    from pmc_ingest.instruct import InstructError, InstructOptions, dry_run, generate_instructions

    fields = {f.name for f in dataclasses.fields(InstructOptions)}
    options = InstructOptions(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    if args.dry_run:
        out = Path(args.out) / "prompts.jsonl"
        info = dry_run(args.pairs, out, options)
        print(f"{info['requests']} prompts written to {out}; about {info['estimated_prompt_tokens']:,} prompt tokens, "
              f"at most {info['max_total_tokens']:,} tokens with replies")
        return 0
    try:
        summary = generate_instructions(args.pairs, args.out, options)
    except InstructError as exc:
        print(f"medvlm: error: {exc}", file=sys.stderr)
        return 2
    print(summary.text())
    print(f"instruction data: {args.out}/instruct.json (images relative to {args.pairs}); cache: {args.out}/cache.jsonl")
    return 0


def _demo(args) -> int:
    from curricula.demo import run_demo

    run_demo(args.out or ("demo_runs/ablation" if args.ablation else "demo_runs/demo"), ablation=args.ablation)
    return 0


def _curriculum_run(args) -> int:
    from curricula.plan import load_curriculum
    from curricula.runner import run_curriculum

    name = load_curriculum(args.file, args.overrides).get("name", Path(args.file).stem)
    run_dir = args.run_dir or f"runs/{name}"
    run_curriculum(args.file, run_dir, args.overrides, only=args.only, from_stage=args.from_stage,
                   base_dir=args.base_dir)
    print(f"run directory: {run_dir} (manifest.json, summary.json, stages/)")
    return 0


def _curriculum_show(args) -> int:
    from curricula.plan import build_plan, load_curriculum
    from curricula.report import show_plan

    data = load_curriculum(args.file, args.overrides)
    print(show_plan(build_plan(data, args.base_dir or Path(args.file).resolve().parent)))
    return 0


def _curriculum_status(args) -> int:
    from curricula.report import show_status

    print(show_status(args.run_dir))
    return 0


def _curriculum_report(args) -> int:
    from curricula.report import write_report

    print(write_report(args.run_dir, args.suite))
    print(f"written: {Path(args.run_dir) / 'ablation.md'}, {Path(args.run_dir) / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
