"""``medvlm ingest instruct``: LLaVA-Med-style instruction data written by GPT-4 (or any OpenAI-compatible
endpoint: OpenAI, Azure OpenAI, a local vLLM or llama.cpp server) from each figure's caption and, when
switched on, the sentences that mention it. The model never sees the image.

Prompting (``prompts/``, swap the files to change it): ``instruct_system.txt`` tells the model it sees the
image through its description and must converse about what a viewer could see, without citing the
caption or the paper; ``instruct_fewshot.jsonl`` holds worked examples. The reply format is plain
alternating ``User:`` / ``Assistant:`` lines (markdown bold around the role is tolerated).

Reliability:
- every response is appended (flushed and fsynced) to ``cache.jsonl`` under a key that hashes (model,
  messages — which hold the prompt and the pair —, pair id, generation parameters) *before* it counts as
  done, so a run killed at any moment resumes without sending a finished request again;
- at most ``max_concurrency`` requests are in flight; 429, 5xx, timeouts and connection errors are
  retried with exponential backoff and jitter, honouring ``Retry-After``; other 4xx (400, 401, 403, 404,
  422) are never retried — a 401 stops the whole run, since no later request can succeed. The retry loop
  is ours rather than the client's built-in one so the budget is checked before every attempt and retries
  are counted;
- ``budget_usd`` / ``max_tokens_total``: before a request is sent, its worst case (prompt estimate +
  ``max_tokens`` of output) is reserved; a request that could cross the budget is not sent. Spending is
  counted from the responses' ``usage``; prices per model are in ``prompts/prices.json`` (editable).

Validation (deterministic, re-done on cached replies, so reruns give identical output): a reply is
rejected, counted by reason, when it is empty, a refusal, has no well-formed User/Assistant pair, or an
answer quotes the caption verbatim for ``quote_words`` words or more.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROMPTS = Path(__file__).parent / "prompts"
REFUSAL = re.compile(r"^\s*(I'?m sorry|I am sorry|I cannot|I can't|I can not|As an AI|I'm unable|I am unable|Sorry,)", re.I)
ROLE_LINE = re.compile(r"^\s*\**\s*(User|Human|Assistant|GPT)\s*\**\s*:\s*\**\s*(.*)$", re.I)


class InstructError(RuntimeError):
    """A run that cannot go on (no API key, unauthorised, unknown price); the message says what to do."""


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


@dataclass
class InstructSummary:
    pairs: int = 0
    cached: int = 0
    sent: int = 0
    retries: int = 0
    failures: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    stopped_by_budget: int = 0
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
        return (f"pairs {self.pairs}: {self.cached} from cache, {self.sent} sent ({self.retries} retries, "
                f"{self.requests_per_second:.1f} requests/s), {self.stopped_by_budget} not sent (budget); "
                f"tokens {self.prompt_tokens} in + {self.completion_tokens} out, cost ${self.cost_usd:.4f}; "
                f"failures {dict(self.failures) or 'none'}; accepted {self.accepted}, rejected {dict(self.rejected) or 'none'}")


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


def _caption(pair: dict) -> str:
    return pair["subcaption"][0] if pair.get("is_subfigure") and pair.get("subcaption") else pair["caption"]


def pair_id(pair: dict) -> str:
    return f"{pair['pmcid']}_{pair['figure_id']}"


def request_key(model: str, messages: list[dict], pid: str, params: dict) -> str:
    payload = json.dumps({"model": model, "messages": messages, "pair": pid, "params": params}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def estimate_tokens(messages: list[dict]) -> int:
    """About 4 characters per token for English (+4 per message of overhead); a budget reservation, not billing."""
    return sum(math.ceil(len(m["content"]) / 4) + 4 for m in messages)


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


# ------------------------------------------------------------------------------------ cache
class ResponseCache:
    """Append-only JSONL of every finished request; the last entry for a key wins."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = {}
        if path.is_file():
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill mid-write: that request is simply sent again
                    self.entries[entry["key"]] = entry

    def append(self, entry: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.entries[entry["key"]] = entry


# ------------------------------------------------------------------------------------ budget
class Budget:
    def __init__(self, options: InstructOptions):
        self.max_usd, self.max_tokens = options.budget_usd, options.max_tokens_total
        self.spent_usd = self.spent_tokens = 0.0
        self.reserved_usd = self.reserved_tokens = 0.0
        self.price = None
        if self.max_usd is not None:
            prices = json.loads(Path(options.prices_file or PROMPTS / "prices.json").read_text())
            if options.model not in prices:
                raise InstructError(f"no price for model {options.model!r} in {options.prices_file or PROMPTS / 'prices.json'}; "
                                    "add one (USD per 1M input/output tokens) or use --max-tokens-total")
            self.price = prices[options.model]

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        if self.price is None:
            return 0.0
        return (prompt_tokens * self.price["input"] + completion_tokens * self.price["output"]) / 1e6

    def reserve(self, prompt_tokens: int, completion_tokens: int) -> bool:
        tokens, usd = prompt_tokens + completion_tokens, self.cost(prompt_tokens, completion_tokens)
        if self.max_tokens is not None and self.spent_tokens + self.reserved_tokens + tokens > self.max_tokens:
            return False
        if self.max_usd is not None and self.spent_usd + self.reserved_usd + usd > self.max_usd:
            return False
        self.reserved_tokens += tokens
        self.reserved_usd += usd
        return True

    def settle(self, reserved: tuple[int, int], usage: tuple[int, int] | None) -> None:
        self.reserved_tokens -= sum(reserved)
        self.reserved_usd -= self.cost(*reserved)
        if usage:
            self.spent_tokens += sum(usage)
            self.spent_usd += self.cost(*usage)


# ------------------------------------------------------------------------------------ the run
def select_pairs(pairs_dir: str | Path, options: InstructOptions) -> list[dict]:
    from .pairs import load_pairs

    pairs = load_pairs(pairs_dir)
    if options.modalities:
        wanted = set(options.modalities)
        pairs = pairs.filter(lambda m: m in wanted, input_columns="modality")
    rows = list(pairs)
    if options.sample is not None and options.sample < len(rows):
        rows = random.Random(options.seed).sample(rows, options.sample)
    if options.limit is not None:
        rows = rows[:options.limit]
    return rows


def _requests(pairs: list[dict], options: InstructOptions) -> list[tuple[dict, list[dict], str]]:
    system = Path(options.system_file or PROMPTS / "instruct_system.txt").read_text(encoding="utf-8").strip()
    fewshot = read_fewshot(options.fewshot_file)
    params = {"temperature": options.temperature, "max_tokens": options.max_tokens}
    out = []
    for pair in pairs:
        messages = build_messages(pair, system, fewshot, options.with_mentions)
        out.append((pair, messages, request_key(options.model, messages, pair_id(pair), params)))
    return out


def dry_run(pairs_dir: str | Path, out_file: str | Path, options: InstructOptions) -> dict:
    """Write the prompts that would be sent (JSONL) and their token estimate; no network."""
    requests = _requests(select_pairs(pairs_dir, options), options)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    total = 0
    with open(out_file, "w", encoding="utf-8") as fh:
        for pair, messages, key in requests:
            tokens = estimate_tokens(messages)
            total += tokens
            fh.write(json.dumps({"id": pair_id(pair), "key": key, "model": options.model, "messages": messages,
                                 "estimated_prompt_tokens": tokens}, ensure_ascii=False) + "\n")
    worst = total + len(requests) * options.max_tokens
    return {"requests": len(requests), "estimated_prompt_tokens": total, "max_total_tokens": worst}


def generate_instructions(pairs_dir: str | Path, out_dir: str | Path, options: InstructOptions,
                          progress: bool = True) -> InstructSummary:
    """The whole run: cache.jsonl, instruct.json (LLaVA records) and summary.json in ``out_dir``."""
    api_key = os.environ.get(options.api_key_env)
    if not api_key:
        raise InstructError(f"no API key: set {options.api_key_env} (for a local server without keys any value works, "
                            "e.g. OPENAI_API_KEY=EMPTY), or choose the variable with --api-key-env")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = select_pairs(pairs_dir, options)
    requests = _requests(pairs, options)
    cache = ResponseCache(out_dir / "cache.jsonl")
    summary = InstructSummary(pairs=len(requests))
    budget = Budget(options)
    for key in {k for _, _, k in requests} & set(cache.entries):
        usage = cache.entries[key].get("usage") or {}
        budget.settle((0, 0), (usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)))
    todo = [r for r in requests if cache.entries.get(r[2], {}).get("status") != "ok"
            and cache.entries.get(r[2], {}).get("status") != "failed"]
    summary.cached = len(requests) - len(todo)
    started = time.perf_counter()
    asyncio.run(_send_all(todo, options, api_key, cache, budget, summary, progress))
    summary.seconds = time.perf_counter() - started
    summary.cost_usd = round(budget.spent_usd, 6)
    _write_output(requests, cache, options, summary, out_dir)
    return summary


async def _send_all(todo, options, api_key, cache, budget, summary, progress) -> None:
    from openai import AsyncOpenAI
    from tqdm.auto import tqdm

    client = AsyncOpenAI(base_url=options.base_url, api_key=api_key, max_retries=0, timeout=options.timeout)
    semaphore = asyncio.Semaphore(options.max_concurrency)
    stop = asyncio.Event()
    bar = tqdm(total=len(todo), desc="instruct", unit="req", disable=not progress)

    async def one(pair, messages, key):
        async with semaphore:
            if stop.is_set():
                return
            await _send_one(client, pair, messages, key, options, cache, budget, summary, stop)
            bar.update(1)

    try:
        results = await asyncio.gather(*(one(*r) for r in todo), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
    finally:
        bar.close()
        await client.close()


async def _send_one(client, pair, messages, key, options, cache, budget, summary, stop) -> None:
    import openai

    prompt_estimate = estimate_tokens(messages)
    reserved = (prompt_estimate, options.max_tokens)
    if not budget.reserve(*reserved):
        summary.stopped_by_budget += 1
        return
    usage = None
    try:
        for attempt in range(options.max_retries + 1):
            try:
                response = await client.chat.completions.create(
                    model=options.model, messages=messages, temperature=options.temperature,
                    max_tokens=options.max_tokens)
            except openai.AuthenticationError as exc:
                stop.set()
                raise InstructError(f"the endpoint refused the API key ({exc.status_code}); check {options.api_key_env}") from exc
            except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                    openai.APIConnectionError) as exc:
                if attempt == options.max_retries:
                    summary.failures[_failure_name(exc)] += 1
                    return
                summary.retries += 1
                await asyncio.sleep(_delay(exc, attempt, options))
                continue
            except openai.APIStatusError as exc:  # 400, 403, 404, 422…: the same request would fail again
                summary.failures[f"http_{exc.status_code}"] += 1
                cache.append({"key": key, "pair_id": pair_id(pair), "status": "failed",
                              "error": f"{exc.status_code}: {exc.message}"[:500]})
                return
            summary.sent += 1
            text = response.choices[0].message.content if response.choices else ""
            if response.usage:
                usage = (response.usage.prompt_tokens or 0, response.usage.completion_tokens or 0)
                summary.prompt_tokens += usage[0]
                summary.completion_tokens += usage[1]
            # fsync off the event loop, so other requests proceed while this one is made durable
            await asyncio.to_thread(cache.append, {
                "key": key, "pair_id": pair_id(pair), "status": "ok", "model": options.model, "text": text or "",
                "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]} if usage else None,
                "time": round(time.time(), 3)})
            return
    finally:
        budget.settle(reserved, usage)


def _failure_name(exc) -> str:
    status = getattr(exc, "status_code", None)
    return f"http_{status}" if status else type(exc).__name__


def _delay(exc, attempt: int, options: InstructOptions) -> float:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return min(options.backoff_max, float(value) * scale)
            except ValueError:
                pass
    return min(options.backoff_max, options.backoff_base * 2 ** attempt) * random.uniform(0.5, 1.5)


def _write_output(requests, cache: ResponseCache, options: InstructOptions, summary: InstructSummary, out_dir: Path) -> None:
    records = []
    for pair, _, key in requests:
        entry = cache.entries.get(key)
        if not entry or entry.get("status") != "ok":
            continue
        turns, reason = validate_reply(entry.get("text", ""), _caption(pair), options.quote_words)
        if reason:
            summary.rejected[reason] += 1
            continue
        records.append(to_record(pair, turns))
    summary.accepted = len(records)
    for name, data in (("instruct.json", records), ("summary.json", summary.as_dict())):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
        os.replace(tmp, out_dir / name)
