"""``medvlm push CHECKPOINT --repo NAME``: publish a checkpoint with its model card (``medvlm/modelcard.py``)."""

from __future__ import annotations


def register(sub) -> None:
    push = sub.add_parser("push", help="upload a checkpoint (with its model card) to the Hugging Face Hub or a folder")
    push.add_argument("checkpoint", help="a checkpoint folder (a stage's checkpoint/)")
    push.add_argument("--repo", required=True, help="Hub repository owner/name, or /path (file://path) for a local folder")
    push.add_argument("--dry-run", action="store_true", help="list what would be uploaded; send nothing")
    push.add_argument("--private", action="store_true", help="create the Hub repository as private")
    push.add_argument("--message", default=None, help="commit message")
    push.set_defaults(handler=run_push)


def run_push(args) -> int:
    from medvlm.modelcard import push

    result = push(args.checkpoint, args.repo, dry_run=args.dry_run, private=args.private, message=args.message)
    for name, size in result["files"]:
        print(f"{size:>14,}  {name}")
    total = sum(size for _, size in result["files"])
    if result["card_written_at_push"]:
        print("(no README.md yet: the model card is written from medvlm.json before uploading)")
    if args.dry_run:
        print(f"dry run: {len(result['files'])} files, {total:,} bytes would go to {result['target']}")
    else:
        print(f"pushed {len(result['files'])} files ({total:,} bytes) to {result['url']}")
    return 0
