"""``medvlm report pairs|instruct|eval``: one self-contained HTML page of figures, conversations or
predictions (``pmc_ingest/report_html.py``, ``downstream/report.py``)."""

from __future__ import annotations


def register(sub) -> None:
    report = sub.add_parser("report", help="static HTML pages: ingest pairs, instruction data, eval predictions")
    pages = report.add_subparsers(title="pages", metavar="PAGE")
    pairs = pages.add_parser("pairs", help="figures with captions, mentions, licenses and the modality histogram")
    pairs.add_argument("pairs_dir", help="a `medvlm ingest pmc --out` folder")
    _sample_options(pairs)
    pairs.set_defaults(handler=run_pairs)
    instruct = pages.add_parser("instruct", help="generated conversations next to the figure and caption they came from")
    instruct.add_argument("instruct_dir", help="a `medvlm ingest instruct --out` folder (or its instruct.json)")
    instruct.add_argument("--pairs", required=True, help="the pairs folder the instructions were generated from")
    _sample_options(instruct)
    instruct.set_defaults(handler=run_instruct)
    evaluation = pages.add_parser("eval", help="predictions with images, wrong first; accuracy by answer type; confusion matrix")
    evaluation.add_argument("run", help="a `medvlm eval --out` folder (answers.jsonl + metrics.json)")
    evaluation.add_argument("--out", help="page to write (default: RUN/report.html)")
    evaluation.add_argument("--limit", type=int, default=None, help="show at most this many questions (wrong first)")
    evaluation.set_defaults(handler=run_eval)



def _sample_options(parser) -> None:
    parser.add_argument("--out", help="page to write (default: inside the input folder)")
    parser.add_argument("--sample", type=int, default=100, help="how many items to show (seeded random sample)")
    parser.add_argument("--seed", type=int, default=0)


def run_pairs(args) -> int:
    from pmc_ingest.report_html import write_pairs_report

    print(f"report: {write_pairs_report(args.pairs_dir, args.out, args.sample, args.seed)}")
    return 0


def run_instruct(args) -> int:
    from pmc_ingest.report_html import write_instruct_report

    print(f"report: {write_instruct_report(args.instruct_dir, args.pairs, args.out, args.sample, args.seed)}")
    return 0


def run_eval(args) -> int:
    from downstream.report import write_eval_report

    print(f"report: {write_eval_report(args.run, args.out, args.limit)}")
    return 0

