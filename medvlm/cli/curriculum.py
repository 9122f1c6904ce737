"""``medvlm curriculum run|show|status|report``: the LLaVA-Med chain and its ablations."""

from __future__ import annotations

from pathlib import Path

from medvlm.cli.options import add_overrides


def register(sub) -> None:
    from downstream.metrics import SUITES

    curriculum = sub.add_parser("curriculum", help="run / plan / inspect a curriculum (the LLaVA-Med chain)")
    actions = curriculum.add_subparsers(title="curriculum commands", metavar="ACTION")
    run = actions.add_parser("run", help="run every stage in order (resumable)")
    run.add_argument("file", help="curriculum YAML (e.g. curricula/llava_med.yaml)")
    run.add_argument("--run-dir", help="run directory (default: runs/NAME)")
    add_overrides(run, "override a curriculum key, e.g. --set stages.4.epochs=3")
    run.add_argument("--only", metavar="STAGE", help="run only this stage (its parent must be finished)")
    run.add_argument("--from", dest="from_stage", metavar="STAGE", help="re-run from this stage on")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --run-dir after a crash or preemption (refused when there is none); "
                          "finished stages are skipped, the unfinished one resumes from its last checkpoint")
    run.add_argument("--base-dir", help="folder that relative data paths are relative to (default: the YAML's folder)")
    run.set_defaults(handler=run_curriculum)
    show = actions.add_parser("show", help="print the plan without loading any weights")
    show.add_argument("file")
    add_overrides(show)
    show.add_argument("--base-dir")
    show.set_defaults(handler=show_curriculum)
    status = actions.add_parser("status", help="each stage's state and metrics")
    status.add_argument("run_dir")
    status.set_defaults(handler=curriculum_status)
    report = actions.add_parser("report", help="the ablation table (Markdown) and a bar chart PNG")
    report.add_argument("run_dir")
    report.add_argument("--suite", default="strict", choices=SUITES, help="metric suite of the table")
    report.set_defaults(handler=curriculum_report)


def run_curriculum(args) -> int:
    from curricula.plan import load_curriculum
    from curricula.runner import StageInterrupted
    from curricula.runner import run_curriculum as run
    from medvlm.cli.errors import INTERRUPTED

    name = load_curriculum(args.file, args.overrides).get("name", Path(args.file).stem)
    run_dir = Path(args.run_dir or f"runs/{name}")
    try:
        run(args.file, run_dir, args.overrides, only=args.only, from_stage=args.from_stage, base_dir=args.base_dir,
            resume=args.resume)
    except StageInterrupted as exc:
        print(exc)
        return INTERRUPTED
    print(f"run directory: {run_dir} (manifest.json, summary.json, stages/)")
    return 0


def show_curriculum(args) -> int:
    from curricula.plan import build_plan, load_curriculum, require_inputs
    from curricula.report import show_plan

    data = load_curriculum(args.file, args.overrides)
    plan = build_plan(data, args.base_dir or Path(args.file).resolve().parent)
    print(show_plan(plan))
    require_inputs(plan.nodes, plan.base_dir)  # the plan is printed either way; missing data fails the command
    return 0


def curriculum_status(args) -> int:
    from curricula.report import show_status

    print(show_status(args.run_dir))
    return 0


def curriculum_report(args) -> int:
    from curricula.report import write_report

    print(write_report(args.run_dir, args.suite))
    print(f"written: {Path(args.run_dir) / 'ablation.md'}, {Path(args.run_dir) / 'ablation.png'}")
    return 0
