"""``medvlm chat``: ask a checkpoint one question about one image."""

from __future__ import annotations

from medvlm.cli.options import add_device


def register(sub) -> None:
    chat = sub.add_parser("chat", help="ask a model a question about an image (PNG/JPEG/DICOM); --web: a browser chat")
    chat.add_argument("question", nargs="?", help="the question (not with --web)")
    chat.add_argument("--model", required=True, help="a checkpoint folder (e.g. a stage's checkpoint/)")
    chat.add_argument("--image", help="image file; DICOM is read with pydicom")
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--template", default=None, help="override the prompt template the model was trained with")
    add_device(chat)
    web = chat.add_argument_group("web chat (Gradio; pip install 'medvlm[web]')")
    web.add_argument("--web", action="store_true", help="open a browser chat: image upload (DICOM too), multi-turn")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: reachable from the network)")
    web.add_argument("--port", type=int, default=7860)
    web.add_argument("--temperature", type=float, default=0.0, help="initial temperature (0: greedy)")
    web.add_argument("--top-p", type=float, default=1.0, help="initial top-p when sampling")
    chat.set_defaults(handler=run_chat)


def run_chat(args) -> int:
    if args.web:
        return run_web(args)
    if not args.question:
        from medvlm.cli.errors import UsageError

        raise UsageError("medvlm chat: give a question, or --web for a browser chat")
    from medvlm.device import load_for_inference
    from medvlm.generate import generate_answers

    bundle = load_for_inference(args.model, device=args.device)
    answer = generate_answers(bundle, [args.question], [args.image], max_new_tokens=args.max_new_tokens,
                              template=args.template)[0]
    print(answer)
    return 0


def run_web(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("medvlm chat --web needs Gradio: pip install 'medvlm[web]'") from exc
    from medvlm.webchat import Decoding, launch

    print(f"web chat for {args.model} on http://{args.host}:{args.port} (Ctrl+C stops it)")
    launch(args.model, host=args.host, port=args.port, template=args.template, device=getattr(args, "device", None),
           decoding=Decoding(args.max_new_tokens, args.temperature, args.top_p))
    return 0
