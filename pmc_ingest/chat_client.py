"""Chat-completion requests to an OpenAI-compatible endpoint (OpenAI, Azure OpenAI, vLLM, llama.cpp…)
with a durable response cache, bounded concurrency, retries and a spending budget.

Used by instruction generation (``pmc_ingest.instruct``); anything that sends many independent prompts
and must survive being killed can use it.

What is durable, what is retried:
- ``cache.jsonl`` gets one line per finished request, appended, flushed and fsynced *before* the request
  counts as done. Only a **chat completion** (a reply text, or the API's own ``refusal``) is a done
  entry; a request that failed — HTTP errors, timeouts, refused connections, a 200 that is not a chat
  completion (a wrong ``--base-url`` often answers with an HTML page or another API's JSON) — is logged
  with ``status: "error"`` and sent again by the next run.
- An ``ok`` entry with no text, usage or refusal (what older versions cached for a 200 that was not a
  completion) is treated as failed, so such caches heal on the next run.
- A line cut by a kill is counted (``corrupt_cache_lines``) and skipped; the next append starts on a
  new line, so the cut line never swallows the entry after it.
- Within a run, 429, 5xx, timeouts and connection errors are retried with exponential backoff and jitter,
  honouring ``Retry-After``; other 4xx are not. 401/403 (key refused) and 404 (wrong URL or model) stop
  the whole run, since no later request can succeed; so do ``max_consecutive_failures`` failed requests
  in a row (a dead server). The retry loop is ours rather than the client's so every attempt is counted.

Budget (``budget_usd`` / ``max_tokens_total``): a request reserves its worst case (prompt estimate +
``max_tokens`` of output) before it is sent and releases the unused part when its reply's ``usage``
arrives. A request that does not fit waits while other requests are in flight (their unused
reservations come back) and is given up only when nothing is in flight and it still does not fit — so
concurrency never lowers how many requests a budget buys. Spending from earlier runs (in the cache)
counts against the budget. Prices per model are in ``prompts/prices.json`` (editable).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

PRICES = Path(__file__).parent / "prompts" / "prices.json"
FATAL_STATUS = {401: "the endpoint refused the API key", 403: "the endpoint refused access",
                404: "the endpoint has no such URL or model"}


class ClientError(RuntimeError):
    """A run that cannot go on (no API key, key refused, unknown price); the message says what to do."""


@dataclass
class Request:
    key: str                  # cache key: a hash of everything that determines the reply
    messages: list[dict]
    tag: str                  # what the request is for (e.g. a pair id), stored with the response


@dataclass
class SendStats:
    sent: int = 0                                        # requests answered with a 200 this run
    retries: int = 0
    failures: Counter = field(default_factory=Counter)   # reason → requests that failed this run
    prompt_tokens: int = 0                               # this run's usage
    completion_tokens: int = 0
    stopped_by_budget: int = 0
    not_attempted: int = 0                               # left unsent after the run was stopped
    stop_reason: str | None = None
    corrupt_cache_lines: int = 0


def estimate_tokens(messages: list[dict]) -> int:
    """About 4 characters per token for English (+4 per message of overhead); a budget reservation, not billing."""
    return sum(math.ceil(len(m["content"]) / 4) + 4 for m in messages)


def load_price(model: str, prices_file: str | Path | None, required: bool) -> dict | None:
    """USD per 1M input/output tokens for ``model``; ``None`` when unknown and not ``required``."""
    path = Path(prices_file or PRICES)
    price = json.loads(path.read_text()).get(model)
    if price is None and required:
        raise ClientError(f"no price for model {model!r} in {path}; add one (USD per 1M input/output tokens) "
                          "or use --max-tokens-total")
    return price


# ------------------------------------------------------------------------------------ cache
class ResponseCache:
    """Append-only JSONL of finished requests; a key is done when it has a ``status: "ok"`` entry."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = {}
        self.corrupt_lines = 0
        self._cut_last_line = False
        if path.is_file():
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    self._cut_last_line = not line.endswith("\n")
                    self._load(line)

    def _load(self, line: str) -> None:
        if not line.strip():
            return
        try:
            entry = json.loads(line)
            key = entry["key"]
        except (json.JSONDecodeError, TypeError, KeyError):
            self.corrupt_lines += 1   # cut by a kill mid-write: that request is simply sent again
            return
        if entry.get("status") == "ok" and not (entry.get("text") or entry.get("usage") or entry.get("refusal")):
            entry = {**entry, "status": "error"}   # written by older medvlm for a 200 that was no completion
        if entry.get("status") == "ok" or self.entries.get(key, {}).get("status") != "ok":
            self.entries[key] = entry

    def done(self, key: str) -> bool:
        return self.entries.get(key, {}).get("status") == "ok"

    def append(self, entry: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            if self._cut_last_line:   # end the cut line, or this entry would be glued to it and lost
                fh.write("\n")
                self._cut_last_line = False
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if entry.get("status") == "ok" or not self.done(entry["key"]):
            self.entries[entry["key"]] = entry


# ------------------------------------------------------------------------------------ budget
class Budget:
    """Spent + reserved never exceeds the limits; see the module docstring."""

    def __init__(self, max_usd: float | None, max_tokens: int | None, price: dict | None):
        self.max_usd, self.max_tokens, self.price = max_usd, max_tokens, price
        self.spent_usd = self.spent_tokens = 0.0
        self.reserved_usd = self.reserved_tokens = 0.0
        self.in_flight = 0
        self._changed: asyncio.Condition | None = None

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        if self.price is None:
            return 0.0
        return (prompt_tokens * self.price["input"] + completion_tokens * self.price["output"]) / 1e6

    def add_spent(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.spent_tokens += prompt_tokens + completion_tokens
        self.spent_usd += self.cost(prompt_tokens, completion_tokens)

    def _fits(self, tokens: int, usd: float) -> bool:
        if self.max_tokens is not None and self.spent_tokens + self.reserved_tokens + tokens > self.max_tokens:
            return False
        return self.max_usd is None or self.spent_usd + self.reserved_usd + usd <= self.max_usd

    async def acquire(self, prompt_tokens: int, completion_tokens: int) -> bool:
        """Reserve a request's worst case, waiting for in-flight requests to settle; False = never fits."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        tokens, usd = prompt_tokens + completion_tokens, self.cost(prompt_tokens, completion_tokens)
        async with self._changed:
            while not self._fits(tokens, usd):
                if self.in_flight == 0:
                    return False
                await self._changed.wait()
            self.in_flight += 1
            self.reserved_tokens += tokens
            self.reserved_usd += usd
            return True

    async def release(self, reserved: tuple[int, int], usage: tuple[int, int] | None) -> None:
        """Give back a reservation, counting what the request really used."""
        async with self._changed:
            self.in_flight -= 1
            self.reserved_tokens -= sum(reserved)
            self.reserved_usd -= self.cost(*reserved)
            if usage:
                self.add_spent(*usage)
            self._changed.notify_all()


# ------------------------------------------------------------------------------------ sending
class _Failed(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass
class _Run:
    options: object
    cache: ResponseCache
    budget: Budget
    stats: SendStats
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    consecutive_failures: int = 0

    def halt(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stats.stop_reason = reason
            self.stop.set()


def send_all(requests: list[Request], options, api_key: str, cache: ResponseCache, budget: Budget,
             stats: SendStats, progress: bool = True) -> None:
    """Send every request (at most ``options.max_concurrency`` at once); results go to ``cache``."""
    asyncio.run(_send_all(requests, options, api_key, cache, budget, stats, progress))


async def _send_all(requests, options, api_key, cache, budget, stats, progress) -> None:
    from openai import AsyncOpenAI
    from tqdm.auto import tqdm

    client = AsyncOpenAI(base_url=options.base_url, api_key=api_key, max_retries=0, timeout=options.timeout)
    run = _Run(options, cache, budget, stats)
    semaphore = asyncio.Semaphore(options.max_concurrency)
    bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not progress)

    async def one(request: Request) -> None:
        async with semaphore:
            if run.stop.is_set():
                stats.not_attempted += 1
                return
            await _send_one(client, request, run)
            bar.update(1)

    try:
        results = await asyncio.gather(*(one(r) for r in requests), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
    finally:
        bar.close()
        await client.close()


async def _send_one(client, request: Request, run: _Run) -> None:
    options, stats = run.options, run.stats
    reserved = (estimate_tokens(request.messages), options.max_tokens)
    if not await run.budget.acquire(*reserved):
        stats.stopped_by_budget += 1
        return
    usage = None
    try:
        response = await _complete(client, request, run)
        stats.sent += 1
        usage = _usage(response)
        if usage:
            stats.prompt_tokens += usage[0]
            stats.completion_tokens += usage[1]
        text, refusal = _reply(response)
        entry = {"key": request.key, "pair_id": request.tag, "status": "ok", "model": options.model, "text": text,
                 "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]} if usage else None,
                 "time": round(time.time(), 3)}
        if refusal:
            entry["refusal"] = refusal
        # fsync off the event loop, so other requests proceed while this one is made durable
        await asyncio.to_thread(run.cache.append, entry)
        run.consecutive_failures = 0
    except _Failed as failure:
        stats.failures[failure.reason] += 1
        await asyncio.to_thread(run.cache.append, {"key": request.key, "pair_id": request.tag, "status": "error",
                                                   "error": f"{failure.reason}: {failure.detail}"[:500]})
        run.consecutive_failures += 1
        if run.consecutive_failures >= options.max_consecutive_failures:
            run.halt(f"{run.consecutive_failures} requests in a row failed (last: {failure.reason} {failure.detail[:120]}); "
                     "check --base-url, --model and the server")
    finally:
        await run.budget.release(reserved, usage)


async def _complete(client, request: Request, run: _Run):
    """The response to one request, retrying what may succeed later; raises ``_Failed`` otherwise."""
    import openai

    options = run.options
    for attempt in range(options.max_retries + 1):
        try:
            return await client.chat.completions.create(
                model=options.model, messages=request.messages, temperature=options.temperature,
                max_tokens=options.max_tokens)
        except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                openai.APIConnectionError) as exc:
            if attempt == options.max_retries or run.stop.is_set():
                raise _Failed(_failure_name(exc), str(exc)) from exc
            run.stats.retries += 1
            await asyncio.sleep(_delay(exc, attempt, options))
        except openai.APIStatusError as exc:  # 400, 401, 403, 404, 422…: the same request would fail again now
            if exc.status_code in FATAL_STATUS:
                run.halt(f"{FATAL_STATUS[exc.status_code]} ({exc.status_code}: {str(exc.message)[:120]}); check "
                         f"--base-url {options.base_url or '(OpenAI)'}, --model {options.model} and {options.api_key_env}")
            raise _Failed(f"http_{exc.status_code}", str(exc.message)) from exc
        except (openai.APIResponseValidationError, json.JSONDecodeError, ValueError) as exc:
            raise _Failed("bad_response", f"not a chat completion: {exc}") from exc
    raise AssertionError("unreachable")


def _reply(response) -> tuple[str, str | None]:
    """(text, refusal) of a chat completion; ``_Failed("bad_response")`` for anything else."""
    choices = getattr(response, "choices", None)
    message = getattr(choices[0], "message", None) if choices else None
    if message is None:
        raise _Failed("bad_response", f"a 200 that is not a chat completion: {str(response)[:120]!r}")
    refusal = getattr(message, "refusal", None)
    if message.content is None and not refusal:
        raise _Failed("bad_response", "a chat completion without content")
    return message.content or "", refusal


def _usage(response) -> tuple[int, int] | None:
    usage = getattr(response, "usage", None)
    if usage is None or not hasattr(usage, "prompt_tokens"):
        return None
    return usage.prompt_tokens or 0, usage.completion_tokens or 0


def _failure_name(exc) -> str:
    status = getattr(exc, "status_code", None)
    return f"http_{status}" if status else type(exc).__name__


def _delay(exc, attempt: int, options) -> float:
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
