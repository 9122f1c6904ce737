"""``medvlm chat``: ask a checkpoint one question about one image."""

from __future__ import annotations


def register(sub) -> None:
    chat = sub.add_parser("chat", help="ask a model a question about an image (PNG/JPEG/DICOM)")
    chat.add_argument("question")
    chat.add_argument("--model", required=True, help="a checkpoint folder (e.g. a stage's checkpoint/)")
    chat.add_argument("--image", help="image file; DICOM is read with pydicom")
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--template", default=None, help="override the prompt template the model was trained with")
    chat.set_defaults(handler=run_chat)


def run_chat(args) -> int:
    from medvlm.generate import generate_answers
    from medvlm.model import load_checkpoint

    bundle = load_checkpoint(args.model)
    answer = generate_answers(bundle, [args.question], [args.image], max_new_tokens=args.max_new_tokens,
                              template=args.template)[0]
    print(answer)
    return 0
