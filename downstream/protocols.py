"""Evaluation protocols: how a published VQA number was produced, as one named, documented bundle.

A protocol fixes the chat template (``None``: the checkpoint's own), where the image goes (before or
after the question), the text added to questions (LLaVA-Med's yes/no option suffix on closed questions,
LLaVA-1.5's short-answer instruction), the decoding (greedy or sampling, temperature) and the token
limit. ``EvalSettings`` is the one typed set of evaluation settings that ``medvlm eval``, a curriculum's
``eval`` stage and ``evaluate_model`` share; ``medvlm finetune`` lays out its training questions with
the protocol it will be scored with (``format_question`` + ``image_first``).

| protocol | reproduces |
|---|---|
| ``medvlm`` (default) | checkpoint's template, image first, greedy, 256 new tokens, questions as the data set poses them |
| ``llava_med_v1`` | LLaVA-Med v1.0.0 ``llava/eval/model_vqa_med.py``: conv ``simple``, question then image, sampling at temperature 0.7, 1024 new tokens, stop at ``###`` |
| ``llava_med_v1_5`` | LLaVA-Med main ``llava/eval/model_vqa.py`` as its README runs it for v1.5: ``mistral_instruct``, image first, temperature 0 (greedy), 1024 new tokens |
| ``llava_1_5_short`` | LLaVA-1.5 short-answer VQA (``model_vqa_loader``, ``scripts/v1_5/eval``): ``vicuna_v1``, "Answer the question using a single word or phrase.", greedy, 128 new tokens |

Why ``medvlm`` is the default: greedy decoding gives the same answers on every rerun, so two checkpoints
can be compared question by question (paired bootstrap); the checkpoint's own template is the prompt it
was trained with; 256 tokens do not cut long zero-shot answers short (32 did, and open recall counts the
words of the whole answer). The LLaVA-Med suffix is part of the protocols that reproduce LLaVA-Med.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from medvlm.registry import RegisteredNames, register

LLAVA_MED_OPTION_SUFFIX = " Please choose from the following two options: [yes, no]"
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
CLOSED_MODES = ("generate", "likelihood")


class ProtocolError(ValueError):
    """An unknown protocol or an evaluation setting out of range; the message names the choices."""


@dataclass(frozen=True)
class Protocol:
    name: str
    template: str | None          # None: the checkpoint's own template
    image_first: bool             # "<image>\nquestion" (True) or "question\n<image>" (False)
    option_suffix: str            # appended to closed questions ("" for none)
    question_suffix: str          # appended to every question ("" for none)
    temperature: float            # 0: greedy
    max_new_tokens: int
    top_p: float | None = None
    source: str = ""


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("medvlm", None, True, "", "", 0.0, 256, source="medvlm's default (see module docstring)"),
    Protocol("llava_med_v1", "simple", False, LLAVA_MED_OPTION_SUFFIX, "", 0.7, 1024,
             source="LLaVA-Med v1.0.0 llava/eval/model_vqa_med.py --conv-mode simple"),
    Protocol("llava_med_v1_5", "mistral_instruct", True, LLAVA_MED_OPTION_SUFFIX, "", 0.0, 1024,
             source="LLaVA-Med main llava/eval/model_vqa.py --conv-mode mistral_instruct --temperature 0.0 (README)"),
    Protocol("llava_1_5_short", "vicuna_v1", True, "", SHORT_ANSWER_SUFFIX, 0.0, 128,
             source="LLaVA-1.5 llava/eval/model_vqa_loader.py --conv-mode vicuna_v1 --temperature 0"),
)}


def register_protocol(protocol: Protocol) -> Protocol:
    """Offer ``protocol`` to ``medvlm eval/finetune --protocol``, eval stages and ``EvalSettings``."""
    return register(PROTOCOLS, protocol.name, protocol)


def protocol_names() -> RegisteredNames:
    """The registered protocol names, read at each use (argparse choices see later registrations)."""
    return RegisteredNames(PROTOCOLS)


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ProtocolError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}") from None


def format_question(protocol: Protocol, question: str, answer_type: str, option_suffix: bool | None = None) -> str:
    """The question as the protocol poses it; the option suffix is not added twice (LLaVA-Med's own test
    files already carry it)."""
    text = question
    suffix = protocol.option_suffix if option_suffix is None else (LLAVA_MED_OPTION_SUFFIX if option_suffix else "")
    if answer_type == "closed" and suffix and "please choose from the following" not in text.lower():
        text += suffix
    return text + protocol.question_suffix


def generation_arguments(protocol: Protocol, tokenizer, stop_strings: tuple[str, ...] = ()) -> dict:
    """``model.generate`` arguments for the protocol's decoding (``stop_strings`` end a reply early)."""
    args: dict = {"do_sample": protocol.temperature > 0}
    if protocol.temperature > 0:
        args["temperature"] = protocol.temperature
        if protocol.top_p is not None:
            args["top_p"] = protocol.top_p
    if stop_strings:
        args.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    return args


def clean_answer(text: str, stop_strings: tuple[str, ...] = (), answer_prefix: str = "") -> str:
    """Cut a generated reply at the first stop string and drop the role name the template makes the model
    write (``simple``: "Assistant:")."""
    for stop in stop_strings:
        text = text.split(stop, 1)[0]
    text = text.strip()
    if answer_prefix and text.startswith(answer_prefix):
        text = text[len(answer_prefix):].strip()
    return text


@dataclass(frozen=True)
class EvalSettings:
    """Every setting of one VQA evaluation; ``None`` means "the protocol's"."""

    protocol: str = "medvlm"
    suites: tuple[str, ...] | None = None      # None: every suite
    batch_size: int = 16
    max_new_tokens: int | None = None
    closed_mode: str = "generate"
    option_suffix: bool | None = None
    seed: int = 0                              # sampling protocols draw from this seed

    def __post_init__(self):
        get_protocol(self.protocol)
        if self.closed_mode not in CLOSED_MODES:
            raise ProtocolError(f"closed_mode {self.closed_mode!r}: choose one of {', '.join(CLOSED_MODES)}")
        if self.batch_size < 1 or (self.max_new_tokens is not None and self.max_new_tokens < 1):
            raise ProtocolError("batch_size and max_new_tokens must be >= 1")
        if self.suites is not None:
            object.__setattr__(self, "suites", tuple(self.suites))

    @classmethod
    def from_mapping(cls, settings: dict) -> "EvalSettings":
        """The evaluation settings among a curriculum stage's keys (the others belong to the stage)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in settings.items() if k in names})

    def with_(self, **changes) -> "EvalSettings":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def spec(self) -> Protocol:
        return get_protocol(self.protocol)

    @property
    def tokens(self) -> int:
        return self.max_new_tokens or self.spec.max_new_tokens

    def describe(self, template: str) -> dict:
        """What ``metrics.json`` records about how the answers were produced."""
        spec = self.spec
        suffix = spec.option_suffix if self.option_suffix is None else (
            LLAVA_MED_OPTION_SUFFIX if self.option_suffix else "")
        return {**asdict(self), "suites": list(self.suites) if self.suites else None, "template": template,
                "image_first": spec.image_first, "option_suffix_text": suffix,
                "question_suffix": spec.question_suffix, "temperature": spec.temperature,
                "max_new_tokens": self.tokens}
