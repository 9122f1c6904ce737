"""Text medvlm may not ship, read from the user's own checkout of microsoft/LLaVA-Med.

LLaVA-Med is under the Microsoft Research License Terms, which forbid distributing its source code and
data, so medvlm carries none of its prompts. ``medvlm ingest instruct --preset llava_med`` and ``medvlm eval
judge --rubric llava_med`` read them from a clone the user made, named by ``--llava-med-repo DIR`` or the
environment variable ``MEDVLM_LLAVA_MED_REPO``. The Python files are parsed with ``ast`` and only literal
values are taken (``ast.literal_eval``): nothing in the checkout is imported or run.

What is read (paths as at LLaVA-Med's tag v1.0.0; the instruct files are gone from its main branch):

- ``llava/instruct/instruct_generate.py``: the instruction writer's system message (the dict literal
  whose ``role`` is ``"system"``);
- ``llava/instruct/instruct_few_shot_examples.py``: ``fs``, the few-shot examples;
- ``llava/instruct/instruct_postprocess.py``: the four phrase lists of ``clean_conv``, told apart by what
  its code does with each (``llava_med_cleaning_lists``);
- ``llava/eval/eval_multimodal_chat_gpt_score.py``: the judge's system message and rubric
  (``instruct_prompt`` at v1.0.0, ``INSTRUCT_PROMPT`` on main).

Errors are ``ReferenceTextError`` (a ``ValueError``: the CLI prints one line and exits 2) naming the
folder, file or variable and how to get a checkout. Nothing is written.
"""

from __future__ import annotations

import ast
import os
from functools import lru_cache
from pathlib import Path

ENV = "MEDVLM_LLAVA_MED_REPO"
CLONE = "git clone https://github.com/microsoft/LLaVA-Med && git -C LLaVA-Med checkout v1.0.0"
GENERATE = "llava/instruct/instruct_generate.py"
FEW_SHOT = "llava/instruct/instruct_few_shot_examples.py"
POSTPROCESS = "llava/instruct/instruct_postprocess.py"
JUDGE = "llava/eval/eval_multimodal_chat_gpt_score.py"
PRESET = "--preset llava_med"


class ReferenceTextError(ValueError):
    """No usable LLaVA-Med checkout; the message says which file or variable and what to do."""


def llava_med_repo(path: str | Path | None, purpose: str) -> Path:
    """The checkout folder: ``path``, else ``$MEDVLM_LLAVA_MED_REPO``; ``purpose`` names the option that needs it."""
    value = path or os.environ.get(ENV)
    if not value:
        raise ReferenceTextError(
            f"{purpose} needs your own LLaVA-Med checkout (LLaVA-Med's licence does not let medvlm ship its text): "
            f"{CLONE}, then pass --llava-med-repo LLaVA-Med (or set {ENV})")
    repo = Path(value).expanduser()
    if not repo.is_dir():
        raise ReferenceTextError(f"LLaVA-Med checkout {repo} (--llava-med-repo / {ENV}) is not a folder; {CLONE}, "
                                 "then pass --llava-med-repo LLaVA-Med")
    return repo.resolve()


@lru_cache(maxsize=None)
def _parse(repo: Path, relative: str) -> ast.Module:
    path = repo / relative
    if not path.is_file():
        raise ReferenceTextError(f"{path} not found: --llava-med-repo must be a LLaVA-Med checkout at tag v1.0.0 "
                                 f"(git -C {repo} checkout v1.0.0, or {CLONE})")
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError) as exc:
        raise ReferenceTextError(f"{path} is not readable Python ({exc}); use an unmodified LLaVA-Med v1.0.0 "
                                 "checkout") from None


def _missing(repo: Path, relative: str, what: str) -> ReferenceTextError:
    return ReferenceTextError(f"{repo / relative}: no {what} found; use an unmodified LLaVA-Med v1.0.0 checkout "
                              f"(git -C {repo} checkout v1.0.0)")


def _literal(node: ast.AST, repo: Path, relative: str, what: str):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise _missing(repo, relative, f"literal {what}") from None


def assigned_literal(repo: Path, relative: str, names: tuple[str, ...]):
    """The literal assigned to the first of ``names`` in the file (module level or a class body)."""
    tree = _parse(repo, relative)
    scopes = [tree.body] + [n.body for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    for name in names:
        for body in scopes:
            for node in body:
                if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                    return _literal(node.value, repo, relative, name)
    raise _missing(repo, relative, " or ".join(names))


def system_message(repo: Path, relative: str) -> str:
    """The ``content`` of the file's ``{"role": "system", "content": ...}`` dict literal."""
    for node in ast.walk(_parse(repo, relative)):
        if isinstance(node, ast.Dict):
            fields = {k.value: v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)}
            role = fields.get("role")
            if isinstance(role, ast.Constant) and role.value == "system" and "content" in fields:
                content = _literal(fields["content"], repo, relative, "system message")
                if isinstance(content, str):
                    return content
    raise _missing(repo, relative, 'system message (a {"role": "system", "content": ...} literal)')


# ------------------------------------------------------------------------------------ LLaVA-Med's texts
def llava_med_system_prompt(repo: str | Path | None) -> str:
    """The instruction writer's system prompt, exactly as LLaVA-Med sends it."""
    return system_message(llava_med_repo(repo, PRESET), GENERATE)


def llava_med_fewshot(repo: str | Path | None) -> list[dict]:
    """``fs``: LLaVA-Med's few-shot examples (``fig_label``, ``fig_caption``, ``in_text_mention``,
    ``conversations``, …) as written there."""
    root = llava_med_repo(repo, PRESET)
    examples = assigned_literal(root, FEW_SHOT, ("fs",))
    if not isinstance(examples, list) or not all(isinstance(e, dict) for e in examples):
        raise _missing(root, FEW_SHOT, "list of example dicts named fs")
    return examples


CLEANING_KEYS = ("drop_turn_if_reply_contains", "strip_reply_prefixes", "remove_from_reply",
                 "drop_turn_if_reply_still_contains")


def llava_med_cleaning_lists(repo: str | Path | None) -> dict[str, tuple[str, ...]]:
    """The phrase lists of ``clean_conv``, keyed by what the code does with them:

    - ``any(key in reply.lower() for key in [...])`` → ``drop_turn_if_reply_contains``;
    - ``for key in [...]:`` whose body calls ``.startswith`` → ``strip_reply_prefixes``;
    - ``for key in [...]:`` whose body calls ``.replace`` → ``remove_from_reply``;
    - ``any(key in reply for key in [...])`` (no ``.lower()``) → ``drop_turn_if_reply_still_contains``."""
    return _cleaning_lists(llava_med_repo(repo, PRESET))


@lru_cache(maxsize=None)
def _cleaning_lists(root: Path) -> dict[str, tuple[str, ...]]:
    function = next((n for n in ast.walk(_parse(root, POSTPROCESS))
                     if isinstance(n, ast.FunctionDef) and n.name == "clean_conv"), None)
    if function is None:
        raise _missing(root, POSTPROCESS, "function clean_conv")
    found: dict[str, tuple[str, ...]] = {}
    for node in ast.walk(function):
        if isinstance(node, ast.For) and isinstance(node.iter, ast.List):
            calls = _method_calls(node)
            key = ("strip_reply_prefixes" if "startswith" in calls else "remove_from_reply" if "replace" in calls
                   else None)
            phrases = node.iter
        elif isinstance(node, ast.GeneratorExp) and isinstance(node.generators[0].iter, ast.List):
            lowered = "lower" in _method_calls(node.elt)
            key = "drop_turn_if_reply_contains" if lowered else "drop_turn_if_reply_still_contains"
            phrases = node.generators[0].iter
        else:
            continue
        if key and key not in found:
            values = _literal(phrases, root, POSTPROCESS, f"phrase list ({key})")
            if not all(isinstance(v, str) for v in values):
                raise _missing(root, POSTPROCESS, f"list of phrases ({key})")
            found[key] = tuple(values)
    absent = [k for k in CLEANING_KEYS if k not in found]
    if absent:
        raise _missing(root, POSTPROCESS, f"clean_conv phrase list(s) {', '.join(absent)}")
    return {k: found[k] for k in CLEANING_KEYS}


def _method_calls(node: ast.AST) -> set[str]:
    """Names of the methods called anywhere in ``node`` (``x.lower()`` → ``lower``)."""
    return {c.func.attr for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)}


def llava_med_judge_prompt(repo: str | Path | None) -> tuple[str, str]:
    """(system message, rubric) of LLaVA-Med's GPT-4 chat scoring, exactly as its script sends them."""
    root = llava_med_repo(repo, "--rubric llava_med")
    rubric = assigned_literal(root, JUDGE, ("instruct_prompt", "INSTRUCT_PROMPT"))
    if not isinstance(rubric, str):
        raise _missing(root, JUDGE, "rubric string instruct_prompt")
    return system_message(root, JUDGE), rubric
