"""``medvlm eval``: evaluate a checkpoint on a VQA split; ``eval score`` re-scores prediction files,
``eval compare`` compares two evaluations, ``eval leakage`` looks for images shared between splits."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medvlm.cli.errors import UsageError
from medvlm.cli.options import add_device


def register(sub) -> None:
    from downstream.datasets import DATASETS
    from downstream.metrics import SUITES
    from downstream.protocols import EvalSettings, protocol_names

    evaluate = sub.add_parser("eval", help="evaluate on a VQA split; `eval score` re-scores files; `eval leakage`",
                              description="medvlm eval --model CKPT --dataset slake --root DIR | "
                                          "medvlm eval score --pred P --gt G | medvlm eval compare RUN_A RUN_B | "
                                          "medvlm eval leakage --dataset vqa-rad --root DIR")
    evaluate.add_argument("--model", help="checkpoint folder")
    evaluate.add_argument("--dataset", choices=DATASETS)
    evaluate.add_argument("--root", help="data set folder or LLaVA-Med JSON")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--lang", default="en", help="SLAKE question language: en, zh or all")
    evaluate.add_argument("--out", help="output folder (default: runs/eval-DATASET-SPLIT)")
    evaluate.add_argument("--suite", action="append", choices=SUITES, help="metric suite (repeatable; default: all)")
    evaluate.add_argument("--batch-size", type=int, default=EvalSettings.batch_size)
    evaluate.add_argument("--protocol", choices=protocol_names(), default=EvalSettings.protocol,
                          help="prompt layout, decoding and token limit of a reference evaluation (README)")
    evaluate.add_argument("--max-new-tokens", type=int, help="default: the protocol's (medvlm: 256)")
    evaluate.add_argument("--closed-mode", choices=["generate", "likelihood"], default="generate")
    evaluate.add_argument("--option-suffix", action=argparse.BooleanOptionalAction, default=None,
                          help="add (or with --no-option-suffix leave off) LLaVA-Med's yes/no option suffix on "
                               "closed questions (default: the protocol's)")
    evaluate.add_argument("--feature-cache", help="folder to keep vision features in across evaluations")
    add_device(evaluate)
    evaluate.add_argument("--candidates", help="LLaVA-Med candidate file {\"0\": [...]} for open accuracy")
    evaluate.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="same as `eval compare RUN_A RUN_B`")
    evaluate.set_defaults(handler=run_eval)
    actions = evaluate.add_subparsers(title="eval commands", metavar="ACTION")
    _register_score(actions, SUITES)
    _register_compare(actions, SUITES)
    _register_leakage(actions, DATASETS)
    _register_judge(actions)


def _register_score(actions, suites) -> None:
    score = actions.add_parser("score", help="re-score prediction files (LLaVA-Med's formats or medvlm's)")
    score.add_argument("--pred", required=True, help="predictions: LLaVA-Med answer file or medvlm answers.jsonl")
    score.add_argument("--gt", required=True, help="ground truth: LLaVA-Med test JSON or medvlm answers.jsonl")
    score.add_argument("--candidates", help="LLaVA-Med candidate file {\"0\": [...]} for open accuracy")
    score.add_argument("--suite", action="append", choices=suites, help="metric suite (repeatable; default: all)")
    score.add_argument("--json", action="store_true", help="print one JSON object")
    score.set_defaults(handler=run_score)


def _register_compare(actions, suites) -> None:
    compare = actions.add_parser("compare", help="two evaluations of the same questions, paired-bootstrap differences")
    compare.add_argument("runs", nargs=2, metavar="RUN", help="eval output folder or its answers.jsonl")
    compare.add_argument("--suite", action="append", choices=suites, help="metric suite (repeatable; default: all)")
    compare.set_defaults(handler=run_compare)


def _register_leakage(actions, datasets) -> None:
    leakage = actions.add_parser("leakage", help="exact and near-duplicate images between a test split and training data")
    leakage.add_argument("--dataset", required=True, choices=datasets)
    leakage.add_argument("--root", required=True, help="data set folder or LLaVA-Med JSON")
    leakage.add_argument("--lang", default="en", help="SLAKE question language: en, zh or all")
    leakage.add_argument("--pairs", help="a pmc_ingest pairs folder to check against the test split "
                                         "(default: the data set's own train split)")
    leakage.add_argument("--out", help="write the full report as JSON here")
    leakage.set_defaults(handler=run_leakage)


def _register_judge(actions) -> None:
    from downstream.judge import RUBRICS
    from downstream.protocols import EvalSettings, protocol_names

    judge = actions.add_parser("judge", help="GPT-judged chat evaluation (LLaVA-Bench / LLaVA-Med qa50 files)")
    judge.add_argument("--questions", required=True, help="question JSONL (LLaVA-Med llava_med_eval_qa50_qa.jsonl style)")
    judge.add_argument("--out", required=True, help="output folder: answers, judge cache, scores, metrics, report")
    source = judge.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint folder whose answers are judged")
    source.add_argument("--answers", help="an existing LLaVA answer file (question_id, text) to judge")
    judge.add_argument("--images", help="folder the questions' image paths are relative to")
    judge.add_argument("--reference", help="reference answer file (question_id, text); default: gpt4_answer")
    judge.add_argument("--protocol", choices=protocol_names(), default=EvalSettings.protocol, help="how --model answers")
    judge.add_argument("--max-new-tokens", type=int, help="default: the protocol's")
    add_device(judge)
    judge.add_argument("--judge-model", default="gpt-4o", help="model name the judge endpoint serves")
    judge.add_argument("--base-url", help="OpenAI-compatible endpoint (default: OpenAI)")
    judge.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    judge.add_argument("--max-concurrency", type=int, default=8, help="judge requests in flight at once")
    judge.add_argument("--budget-usd", type=float, help="never send a request that could cross this spend")
    judge.add_argument("--max-tokens-total", type=int, help="never send a request that could cross this many tokens")
    rubric = judge.add_mutually_exclusive_group()
    rubric.add_argument("--rubric", choices=RUBRICS, default=RUBRICS[0],
                        help="the judge's instruction: LLaVA-Bench's rule, or LLaVA-Med's (read from --llava-med-repo)")
    rubric.add_argument("--rubric-file", help="a file holding your own judge instruction instead")
    judge.add_argument("--llava-med-repo", help="your clone of microsoft/LLaVA-Med, which --rubric llava_med reads "
                                                "(default: $MEDVLM_LLAVA_MED_REPO)")
    judge.set_defaults(handler=run_judge_command)


def run_judge_command(args) -> int:
    from downstream import judge as jd
    from downstream.protocols import EvalSettings

    rubric = jd.load_rubric(args.rubric, args.rubric_file, args.llava_med_repo)
    questions = jd.read_questions(args.questions)
    answered_with = None
    if args.answers:
        answers = jd.read_answers(args.answers)
    else:
        from medvlm.device import describe, load_for_inference

        settings = EvalSettings(protocol=args.protocol, max_new_tokens=args.max_new_tokens)
        bundle = load_for_inference(args.model, device=args.device)
        answers = jd.answer_questions(bundle, questions, args.images, args.out, settings)
        answered_with = {**describe(bundle.model), "protocol": args.protocol}
    references = jd.read_answers(args.reference) if args.reference else None
    options = jd.judge_options(model=args.judge_model, base_url=args.base_url, api_key_env=args.api_key_env,
                               max_concurrency=args.max_concurrency, budget_usd=args.budget_usd,
                               max_tokens_total=args.max_tokens_total)
    result = jd.run_judge(questions, answers, args.out, options, references, answered_with=answered_with, rubric=rubric)
    print(jd.format_report(result), end="")
    print(f"scores: {Path(args.out) / 'scores.jsonl'}\nmetrics: {Path(args.out) / 'metrics.json'}")
    return 0


def _suites(args) -> list[str]:
    from downstream.metrics import SUITES

    return args.suite or list(SUITES)


def run_eval(args) -> int:
    if args.compare:
        args.runs = args.compare
        return run_compare(args)
    if not (args.model and args.dataset and args.root):
        raise UsageError("medvlm eval needs --model, --dataset and --root (or one of: eval score, eval compare, eval leakage)")
    from downstream import evaluate as ev
    from downstream.datasets import load_vqa
    from downstream.metrics import format_table, read_candidates
    from downstream.protocols import EvalSettings
    from medvlm.device import data_parallel, load_for_inference

    suites = _suites(args)
    records, report = load_vqa(args.dataset, args.root, args.split, args.lang)
    candidates = read_candidates(args.candidates) if args.candidates else None
    out = Path(args.out or f"runs/eval-{args.dataset}-{args.split}")
    settings = EvalSettings(protocol=args.protocol, suites=tuple(suites), batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, closed_mode=args.closed_mode,
                            option_suffix=args.option_suffix)
    result = ev.evaluate_model(load_for_inference(args.model, device=args.device), records, out, settings,
                               candidates=candidates,
                               feature_cache_dir=args.feature_cache)
    if data_parallel()[0] != 0:  # under a launcher rank 0 reports; every rank returns the same result
        return 0
    print(format_table(result, suites))
    if report.skipped:
        print(f"skipped: {dict(report.skipped)}")
    print(f"answers: {out / 'answers.jsonl'}\nmetrics: {out / 'metrics.json'}\nreport: {out / 'report.md'}")
    return 0


def run_score(args) -> int:
    from downstream.evaluate import score_files
    from downstream.metrics import format_table

    suites = _suites(args)
    result = score_files(args.pred, args.gt, args.candidates, suites)
    print(json.dumps(result) if args.json else format_table(result, suites))
    repeated = result.get("repeated_ids")
    if repeated and not args.json:
        print(f"note: {repeated['count']} question ids appear more than once (e.g. {repeated['ids'][:5]}); "
              f"{repeated['rule']}")
    return 0


def run_compare(args) -> int:
    from downstream.evaluate import compare_runs, format_comparison

    print(format_comparison(compare_runs(*args.runs, suites=_suites(args))))
    return 0


def run_leakage(args) -> int:
    from downstream.datasets import load_vqa
    from downstream.leakage import leakage_report

    test, _ = load_vqa(args.dataset, args.root, "test", args.lang)
    if args.pairs:
        from pmc_ingest.pairs import load_pairs

        train_images = [str(Path(args.pairs) / p) for p in load_pairs(args.pairs)["image_path"]]
        against = f"pairs table {Path(args.pairs)}"
    else:
        train, _ = load_vqa(args.dataset, args.root, "train", args.lang)
        train_images, against = [r.image for r in train], "its train split"
    report = leakage_report(train_images, [r.image for r in test])
    print(f"{args.dataset} test split vs {against}: {report['test_images']} test images, "
          f"{report['exact_duplicates']} exact and {report['near_duplicates']} near duplicates")
    for pair in (report["exact"] + report["near"])[:20]:
        print(f"  {pair['test']}  ==  {pair['train']}")
    if args.out:
        from medvlm.fileio import atomic_write_json

        atomic_write_json(args.out, report)
        print(f"report: {Path(args.out)}")
    return 0
