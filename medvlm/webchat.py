"""``medvlm chat --model CKPT --web``: a browser chat with a checkpoint (Gradio), as LLaVA's web demo.

Upload an image — PNG, JPEG or DICOM (read by ``imaging.load_image``: rescale, VOI window, MONOCHROME1) —
see what the model sees (the decoded image), and ask questions in a multi-turn conversation; a new image
starts a new conversation. The page shows the checkpoint, its prompt template, device and dtype, and the
decoding settings (max new tokens, temperature, top-p; temperature 0 is greedy, the answer ``medvlm chat``
prints).

Each reply is generated from the whole conversation so far, encoded by the same template code as
training (``conversation.encode`` with a generation prompt), through ``LlavaForConditionalGeneration.generate``.
Nothing is sent anywhere: the server listens on ``127.0.0.1`` unless told otherwise, Gradio's analytics off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .conversation import encode
from .generate import _pixels, _stop_ids
from .imaging import ImageLoadError, load_image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@dataclass
class Decoding:
    max_new_tokens: int = 256
    temperature: float = 0.0    # 0: greedy
    top_p: float = 1.0

    def generate_kwargs(self, bundle) -> dict:
        sampled = self.temperature > 0
        kwargs = dict(max_new_tokens=int(self.max_new_tokens), do_sample=sampled, num_beams=1,
                      eos_token_id=_stop_ids(bundle), pad_token_id=bundle.tokenizer.pad_token_id)
        if sampled:
            kwargs.update(temperature=float(self.temperature), top_p=float(self.top_p))
        return kwargs


def conversation_turns(history: list[dict], question: str, has_image: bool) -> list[dict]:
    """Chat messages (``{"role", "content"}``) + the new question as LLaVA turns; ``<image>`` in the first."""
    turns = [{"from": "human" if m["role"] == "user" else "gpt", "value": _text(m["content"])} for m in history]
    turns.append({"from": "human", "value": question})
    if has_image:
        turns[0] = {"from": "human", "value": "<image>\n" + turns[0]["value"]}
    return turns


def _text(content) -> str:
    """Gradio may hand content back as a string or as a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in parts)


@torch.no_grad()
def reply(bundle, history: list[dict], question: str, image, decoding: Decoding, template: str | None = None,
          system: str | None = None) -> str:
    """The model's answer to ``question`` after ``history`` about ``image`` (a path, a PIL image or ``None``)."""
    model = bundle.model.eval()
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    encoded = encode(template or bundle.template, conversation_turns(history, question, image is not None),
                     bundle.tokenizer, bundle.image_token_id, bundle.num_image_tokens, image is not None,
                     add_generation_prompt=True, system=system)
    ids = torch.tensor([encoded.input_ids], device=device)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if image is not None:
        kwargs["pixel_values"] = _pixels(bundle, image, "pad").unsqueeze(0).to(device=device, dtype=dtype)
    out = model.generate(**kwargs, **decoding.generate_kwargs(bundle))
    return bundle.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def describe(bundle, model_path: str | Path, template: str) -> str:
    from .device import describe as placement

    where = placement(bundle.model)
    return (f"**Checkpoint** `{model_path}` · **template** `{template}` · **device** `{where['device']}` · "
            f"**dtype** `{where['dtype']}` · **attention** `{where['attn_implementation']}`. "
            "Research use only; not for diagnosis.")


def build_app(bundle, model_path: str | Path, template: str | None = None, system: str | None = None,
              decoding: Decoding | None = None):
    """The Gradio ``Blocks`` app. API names (for ``gradio_client``): ``/preview`` and ``/ask``."""
    import gradio as gr

    template = template or bundle.template
    decoding = decoding or Decoding()

    def preview(path):
        if not path:
            return None, [], "No image: questions are answered from text alone."
        try:
            return load_image(path), [], f"Loaded {Path(path).name}; a new conversation starts."
        except ImageLoadError as exc:
            raise gr.Error(str(exc)) from exc

    def ask(path, question, history, max_new_tokens, temperature, top_p):
        if not question or not question.strip():
            raise gr.Error("Type a question first.")
        history = list(history or [])
        settings = Decoding(int(max_new_tokens), float(temperature), float(top_p))
        try:
            answer = reply(bundle, history, question.strip(), path or None, settings, template, system)
        except ImageLoadError as exc:
            raise gr.Error(str(exc)) from exc
        return history + [{"role": "user", "content": question.strip()}, {"role": "assistant", "content": answer}], ""

    with gr.Blocks(title="medvlm chat") as app:
        gr.Markdown("## medvlm chat\n" + describe(bundle, model_path, template))
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image (PNG, JPEG or DICOM)", type="filepath", elem_id="image-upload")
                seen = gr.Image(label="What the model sees", type="pil", interactive=False, elem_id="image-preview")
                status = gr.Markdown(elem_id="image-status")
                with gr.Accordion("Decoding", open=True):
                    max_new = gr.Slider(1, 1024, value=decoding.max_new_tokens, step=1, label="max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=decoding.temperature, step=0.05,
                                            label="temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=decoding.top_p, step=0.05, label="top-p (when sampling)")
            with gr.Column(scale=2):
                chat = gr.Chatbot(label="Conversation", elem_id="conversation", height=420)
                question = gr.Textbox(label="Question", placeholder="What does the image show?", elem_id="question")
                with gr.Row():
                    send = gr.Button("Ask", variant="primary", elem_id="ask")
                    clear = gr.Button("New conversation", elem_id="clear")
        upload.change(preview, upload, [seen, chat, status], api_name="preview")
        inputs = [upload, question, chat, max_new, temperature, top_p]
        send.click(ask, inputs, [chat, question], api_name="ask")
        question.submit(ask, inputs, [chat, question], api_name=False)
        clear.click(lambda: [], None, chat, api_name=False)
    return app


def launch(model_path: str | Path, host: str = "127.0.0.1", port: int | None = None, template: str | None = None,
           system: str | None = None, decoding: Decoding | None = None, block: bool = True, device: str | None = None):
    """Load the checkpoint where models run (``device.py``: the accelerator when present), start the server;
    returns ``(app, url)`` (``block=False`` returns at once)."""
    from .device import load_for_inference

    bundle = load_for_inference(model_path, device)
    app = build_app(bundle, model_path, template, system, decoding)
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block,
                           share=False, footer_links=["api"])
    return app, url
