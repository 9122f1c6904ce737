"""``medvlm ingest instruct``: LLaVA-Med-style instruction data written by GPT-4 (or any OpenAI-compatible
endpoint: OpenAI, Azure OpenAI, a local vLLM or llama.cpp server) from each figure's caption and, when
switched on, the sentences that mention it. The model never sees the image.

Prompting (``prompts/``, swap the files to change it): ``instruct_system.txt`` tells the model it sees the
image through its description and must converse about what a viewer could see, without citing the
caption or the paper; ``instruct_fewshot.jsonl`` holds worked examples. The reply format is plain
alternating ``User:`` / ``Assistant:`` lines (markdown bold around the role is tolerated).

Reliability and budget: ``pmc_ingest.chat_client`` (cache before done — only completions are done, so a
404, a refused connection or a wrong-shaped 200 is sent again by the next run —, retries, a budget that
concurrency cannot shrink, a run stopped early when the endpoint is wrong or dead). A run that ends with
no usable record still writes ``summary.json`` and then raises ``InstructError`` (the CLI exits non-zero).
Tokens and cost are reported for this run and for all runs on the output folder (``total_*``).

Validation (deterministic, re-done on cached replies, so reruns give identical output): a reply is
rejected, counted by reason, when it is empty, a refusal, has no well-formed User/Assistant pair, or an
answer quotes the caption verbatim for ``quote_words`` words or more.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medvlm.fileio import atomic_path, atomic_write_json

from .chat_client import (Budget, ClientError, Request, ResponseCache, SendStats, estimate_tokens, load_price,
                          send_all)
from .pairs import figure_caption as _caption  # the name instruct_presets imports

PROMPTS = Path(__file__).parent / "prompts"
REFUSAL = re.compile(r"^\s*(I'?m sorry|I am sorry|I cannot|I can't|I can not|As an AI|I'm unable|I am unable|Sorry,)", re.I)
ROLE_LINE = re.compile(r"^\s*\**\s*(User|Human|Assistant|GPT)\s*\**\s*:\s*\**\s*(.*)$", re.I)


InstructError = ClientError   # a run that cannot go on; the message says what to do


@dataclass
class InstructOptions:
    model: str = "gpt-4o"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 8
    max_retries: int = 6
    timeout: float = 120.0
    temperature: float = 0.7
    max_tokens: int = 1024
    with_mentions: bool = True
    budget_usd: float | None = None
    max_tokens_total: int | None = None
    prices_file: str | None = None
    modalities: list[str] | None = None
    limit: int | None = None
    sample: int | None = None
    seed: int = 0
    system_file: str | None = None
    fewshot_file: str | None = None
    quote_words: int = 10
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_consecutive_failures: int = 50
    preset: str = "medvlm"          # prompt and record recipe (instruct_presets.py): medvlm | llava_med
    llava_med_repo: str | None = None   # --preset llava_med: your LLaVA-Med checkout (reference_text.py)


@dataclass
class InstructSummary(SendStats):
    """What a run did; tokens and ``cost_usd`` are this run's, ``total_*`` include earlier runs' cached replies."""
    pairs: int = 0
    cached: int = 0
    total_prompt_tokens: int = 0
    total_completion_tokens: int = 0
    cost_usd: float = 0.0
    total_cost_usd: float = 0.0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def requests_per_second(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        data = asdict(self)
        data["failures"], data["rejected"] = dict(self.failures), dict(self.rejected)
        data["requests_per_second"] = round(self.requests_per_second, 3)
        return data

    def text(self) -> str:
        stopped = f"; stopped early: {self.stop_reason} ({self.not_attempted} not attempted)" if self.stop_reason else ""
        return (f"pairs {self.pairs}: {self.cached} from cache, {self.sent} sent ({self.retries} retries, "
                f"{self.requests_per_second:.1f} requests/s), {self.stopped_by_budget} not sent (budget); "
                f"this run tokens {self.prompt_tokens} in + {self.completion_tokens} out, cost ${self.cost_usd:.4f}; "
                f"all runs tokens {self.total_prompt_tokens} in + {self.total_completion_tokens} out, "
                f"cost ${self.total_cost_usd:.4f}; failures {dict(self.failures) or 'none'}; "
                f"accepted {self.accepted}, rejected {dict(self.rejected) or 'none'}{stopped}")


# ------------------------------------------------------------------------------------ prompts
def read_fewshot(path: str | Path | None = None) -> list[dict]:
    path = Path(path) if path else PROMPTS / "instruct_fewshot.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def describe(caption: str, mentions: list[str], with_mentions: bool) -> str:
    text = f"Figure Caption:\n{caption.strip()}"
    if with_mentions and mentions:
        text += "\n\nFigure Context:\n" + "\n".join(f"- {m.strip()}" for m in mentions)
    return text


def build_messages(pair: dict, system: str, fewshot: list[dict], with_mentions: bool) -> list[dict]:
    messages = [{"role": "system", "content": system}]
    for example in fewshot:
        messages.append({"role": "user", "content": describe(example["caption"], example.get("mentions", []), with_mentions)})
        messages.append({"role": "assistant", "content": example["conversation"]})
    messages.append({"role": "user", "content": describe(_caption(pair), pair.get("inline_mentions") or [], with_mentions)})
    return messages


def pair_id(pair: dict) -> str:
    return f"{pair['pmcid']}_{pair['figure_id']}"


def request_key(model: str, messages: list[dict], pid: str, params: dict) -> str:
    payload = json.dumps({"model": model, "messages": messages, "pair": pid, "params": params}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# ------------------------------------------------------------------------------------ validation
def parse_conversation(text: str) -> list[tuple[str, str]]:
    """``User:``/``Assistant:`` lines → [(role, text)]; continuation lines join the turn above."""
    turns: list[tuple[str, str]] = []
    for line in (text or "").splitlines():
        match = ROLE_LINE.match(line)
        if match:
            role = "human" if match.group(1).lower() in ("user", "human") else "gpt"
            turns.append((role, match.group(2).strip().strip("*").strip()))
        elif turns and line.strip():
            turns[-1] = (turns[-1][0], (turns[-1][1] + "\n" + line.strip()).strip())
    return turns


def _longest_shared_run(a: list[str], b: list[str]) -> int:
    best = 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            if x == y:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def validate_reply(text: str, caption: str, quote_words: int = 10) -> tuple[list[tuple[str, str]] | None, str | None]:
    """(turns, None) when usable; (None, reason) otherwise."""
    if not text or not text.strip():
        return None, "empty"
    if REFUSAL.match(text):
        return None, "refusal"
    turns = parse_conversation(text)
    pairs = []
    for i in range(0, len(turns) - 1, 2):
        (r1, q), (r2, a) = turns[i], turns[i + 1]
        if r1 != "human" or r2 != "gpt" or not q or not a:
            break
        pairs.append(((r1, q), (r2, a)))
    if not pairs:
        return None, "unparseable"
    caption_words = _words(caption)
    for _, (_, answer) in pairs:
        if _longest_shared_run(_words(answer), caption_words) >= quote_words:
            return None, "quotes_caption"
    return [t for pair in pairs for t in pair], None


def to_record(pair: dict, turns: list[tuple[str, str]]) -> dict:
    conversations = [{"from": role, "value": text} for role, text in turns]
    conversations[0]["value"] = f"{conversations[0]['value']}\n<image>"
    return {"id": pair_id(pair), "image": pair["image_path"], "pmcid": pair["pmcid"], "modality": pair.get("modality"),
            "conversations": conversations}


# ------------------------------------------------------------------------------------ the run
def select_pairs(pairs_dir: str | Path, options: InstructOptions) -> list[dict]:
    from .pairs import load_pairs

    pairs = load_pairs(pairs_dir)
    if options.modalities:
        from .alignment import canonical_modalities

        wanted = set(canonical_modalities(options.modalities))
        pairs = pairs.filter(lambda m: m in wanted, input_columns="modality")
    rows = list(pairs)
    if options.sample is not None and options.sample < len(rows):
        rows = random.Random(options.seed).sample(rows, options.sample)
    if options.limit is not None:
        rows = rows[:options.limit]
    return rows


def _requests(pairs_dir: str | Path, options: InstructOptions) -> list[tuple[dict, list[dict], str]]:
    from .instruct_presets import get_preset

    preset = get_preset(options.preset)
    system, fewshot = preset.prompt(options)   # before the pairs load: a missing prompt fails fast
    pairs = select_pairs(pairs_dir, options)
    params = {"temperature": options.temperature, "max_tokens": options.max_tokens}
    out = []
    for pair in pairs:
        messages = preset.build_messages(pair, system, fewshot, options.with_mentions)
        out.append((pair, messages, request_key(options.model, messages, pair_id(pair), params)))
    return out


def dry_run(pairs_dir: str | Path, out_file: str | Path, options: InstructOptions) -> dict:
    """Write the prompts that would be sent (JSONL), their token estimate and, where the model has a price,
    the dollar estimate (prompts only, and the worst case with ``max_tokens`` replies); no network."""
    requests = _requests(pairs_dir, options)
    out_file = Path(out_file)
    total = 0
    with atomic_path(out_file) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for pair, messages, key in requests:
            tokens = estimate_tokens(messages)
            total += tokens
            fh.write(json.dumps({"id": pair_id(pair), "key": key, "model": options.model, "messages": messages,
                                 "estimated_prompt_tokens": tokens}, ensure_ascii=False) + "\n")
    replies = len(requests) * options.max_tokens
    price = Budget(None, None, load_price(options.model, options.prices_file, required=False))
    known = price.price is not None
    return {"requests": len(requests), "estimated_prompt_tokens": total, "max_total_tokens": total + replies,
            "estimated_prompt_usd": round(price.cost(total, 0), 4) if known else None,
            "max_total_usd": round(price.cost(total, replies), 4) if known else None}


def generate_instructions(pairs_dir: str | Path, out_dir: str | Path, options: InstructOptions,
                          progress: bool = True) -> InstructSummary:
    """The whole run: cache.jsonl, instruct.json (LLaVA records) and summary.json in ``out_dir``.

    Raises ``InstructError`` — after writing both files — when the run was stopped (key refused, wrong URL,
    dead server) or produced no usable record."""
    api_key = os.environ.get(options.api_key_env)
    if not api_key:
        raise InstructError(f"no API key: set {options.api_key_env} (for a local server without keys any value works, "
                            "e.g. OPENAI_API_KEY=EMPTY), or choose the variable with --api-key-env")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    requests = _requests(pairs_dir, options)
    cache = ResponseCache(out_dir / "cache.jsonl")
    summary = InstructSummary(pairs=len(requests), corrupt_cache_lines=cache.corrupt_lines)
    budget = Budget(options.budget_usd, options.max_tokens_total,
                    load_price(options.model, options.prices_file, required=options.budget_usd is not None))
    for key in {k for _, _, k in requests if cache.done(k)}:
        usage = cache.entries[key].get("usage") or {}
        budget.add_spent(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
    todo = [Request(key, messages, pair_id(pair)) for pair, messages, key in requests if not cache.done(key)]
    summary.cached = len(requests) - len(todo)
    started = time.perf_counter()
    send_all(todo, options, api_key, cache, budget, summary, progress)
    summary.seconds = time.perf_counter() - started
    summary.cost_usd = round(budget.cost(summary.prompt_tokens, summary.completion_tokens), 6)
    summary.total_cost_usd = round(budget.spent_usd, 6)
    _write_output(requests, cache, options, summary, out_dir)
    _raise_if_unusable(summary, out_dir)
    return summary


def _raise_if_unusable(summary: InstructSummary, out_dir: Path) -> None:
    where = f"summary: {out_dir / 'summary.json'}"
    if summary.stop_reason:
        raise InstructError(f"run stopped: {summary.stop_reason}; {summary.accepted} records kept, "
                            f"rerun to send the rest ({where})")
    if summary.pairs and not summary.accepted:
        why = {**summary.failures, **summary.rejected}
        if summary.stopped_by_budget:
            why["over_budget"] = summary.stopped_by_budget
        raise InstructError(f"no usable instruction data from {summary.pairs} pairs ({why or 'nothing sent'}); "
                            f"check --base-url / --model and the server, then rerun ({where})")


def _write_output(requests, cache: ResponseCache, options: InstructOptions, summary: InstructSummary, out_dir: Path) -> None:
    from .instruct_presets import get_preset

    preset = get_preset(options.preset)
    records = []
    for pair, _, key in requests:
        if not cache.done(key):
            continue
        entry = cache.entries[key]
        usage = entry.get("usage") or {}
        summary.total_prompt_tokens += usage.get("prompt_tokens", 0)
        summary.total_completion_tokens += usage.get("completion_tokens", 0)
        record, reason = preset.to_record(pair, entry.get("text", ""), options)
        if entry.get("refusal"):
            record, reason = None, "refusal"
        if reason:
            summary.rejected[reason] += 1
            continue
        records.append(record)
    summary.accepted = len(records)
    atomic_write_json(out_dir / "instruct.json", records, indent=1)
    atomic_write_json(out_dir / "summary.json", summary.as_dict(), indent=1)
