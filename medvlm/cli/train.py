"""``medvlm train STAGE.yaml``: one training stage."""

from __future__ import annotations

from medvlm.cli.errors import INTERRUPTED
from medvlm.cli.options import add_overrides


def register(sub) -> None:
    train = sub.add_parser("train", help="run one training stage from a stage YAML")
    train.add_argument("config", help="stage YAML (see medvlm/config.py StageConfig for every key)")
    add_overrides(train, "override a config key, e.g. --set lr=1e-4 --set lora.r=16 (repeatable)")
    train.add_argument("--restart", action="store_true",
                       help="start over in an output_dir that holds a run with another config (the old run is kept "
                            "in output_dir/.replaced-TIME/ until the new one completes)")
    train.set_defaults(handler=run_train)


def run_train(args) -> int:
    from medvlm.config import load_stage
    from medvlm.trainer import train_stage

    config = load_stage(args.config, args.overrides)
    result = train_stage(config, restart=args.restart)
    if result.interrupted:
        print(f"interrupted; resume state in {result.checkpoint}. Run the same command again to resume.")
        return INTERRUPTED
    print(f"checkpoint: {result.checkpoint}\nlog: {result.output_dir / 'log.jsonl'}\nmetrics: {result.output_dir / 'metrics.json'}")
    return 0
