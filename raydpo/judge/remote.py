"""A judge over any OpenAI-compatible API (`judge.kind=openai`): the requests, and what
keeps them safe to run for hours against an endpoint raydpo does not own.

One request is one order of one comparison (or one rubric score). It goes:

    verdict cache -> a concurrency slot -> pacing (requests and tokens per minute, one
    schedule shared by every replica) -> POST with a timeout -> on 429, 5xx, a timeout
    or a dropped connection: again after exponential backoff with jitter, or after the
    server's Retry-After -> a circuit breaker: after `breaker_failures` failed attempts
    in a row (over at least `breaker_after_s` without a success) every call fails at once
    with a JudgeError, so the run stops with what happened and `--resume` continues it
    once the endpoint answers again.

The HTTP client is the `openai` package, with its own retries off (max_retries=0):
its retries would bypass the shared pacing and go uncounted. Nothing here imports Ray;
`raydpo.judge.remote_app` is the Serve deployment around it, and `Pacer` runs there
inside one Ray actor.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import math
import os
import random
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from raydpo.errors import JudgeError
from raydpo.judge.rules import DEFAULT_TEMPLATE, combine_both_orders, parse_verdict, render_judge_prompt
from raydpo.records import Judgement

RETRY_STATUS = frozenset({408, 409, 429})  # and every 5xx
ITEM_STATUS = frozenset({400, 413, 422})  # this request's problem (too long, filtered): an unparseable answer, counted
MAX_RETRY_AFTER_S = 120.0  # a Retry-After beyond this is taken as this: the breaker, not a sleep, ends a dead endpoint
DEFAULT_RUBRIC = ("Rate how well the response answers the request, from 1 (poor) to 10 (excellent).\n\n"
                  "Request:\n{prompt}\n\nResponse:\n{response}\n\nAnswer with one number.\nScore:")
DEFAULT_SCORE_PATTERN = r"(-?\d+(?:\.\d+)?)"


@dataclass(frozen=True)
class RemoteSettings:
    """What a remote judge replica needs; built from `judge` + `judge.remote` (`raydpo.judge.kinds`)."""

    base_url: str
    model: str
    api: str = "chat"  # or "completions"
    api_key_env: str | None = "OPENAI_API_KEY"
    mode: str = "pairwise"  # or "pointwise": a rubric score per response
    template: str | None = None
    answer_pattern: str = r"\b([AB])\b"
    answers: tuple[tuple[str, str], ...] = (("A", "a"), ("B", "b"))
    max_new_tokens: int = 8
    max_concurrency: int = 16
    requests_per_minute: float = 0.0  # 0: no limit
    tokens_per_minute: float = 0.0
    timeout_s: float = 60.0
    max_retries: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    breaker_failures: int = 20
    breaker_after_s: float = 10.0
    breaker_cooldown_s: float = 30.0
    price_prompt_per_1k: float = 0.0
    price_completion_per_1k: float = 0.0
    cache_dir: str | None = None
    tie_margin: float = 0.0  # pointwise: score gaps at or below this are ties


# ------------------------------------------------------------------ pacing


class Pacer:
    """Requests and tokens per minute as a schedule of start times (pure; `now` is passed in).

    A request starts at least 60/rpm s after the one before it, so no 60-second window holds
    more than rpm starts. Tokens are paced the same way: a request of n tokens takes
    n * 60/tpm s of the token budget, and the next one starts when that is spent, so a
    window's tokens stay within tpm plus one request. No burst credit builds up while idle.
    A request's tokens are estimated before it is sent (its prompt's characters / 4 plus
    max_new_tokens) and corrected by `settle` from the server's `usage`."""

    def __init__(self, requests_per_minute: float = 0.0, tokens_per_minute: float = 0.0):
        self.gap = 60.0 / requests_per_minute if requests_per_minute > 0 else 0.0
        self.per_token = 60.0 / tokens_per_minute if tokens_per_minute > 0 else 0.0
        self.next_start = -math.inf
        self.tokens_free_at = -math.inf

    def reserve(self, tokens: int, now: float) -> float:
        """The time the request may start (>= now); the schedule counts it from then on."""
        start = max(now, self.next_start, self.tokens_free_at if self.per_token else now)
        self.next_start = start + self.gap
        if self.per_token:
            self.tokens_free_at = start + tokens * self.per_token
        return start

    def settle(self, extra_tokens: int) -> None:
        """Correct the last estimates by what the server counted (negative: fewer)."""
        if self.per_token:
            self.tokens_free_at += extra_tokens * self.per_token


def parse_score(text: str, pattern: str) -> float:
    """The first match of `pattern` (its first group) as a number; NaN when there is none
    (counted by the caller as unranked, never a default score)."""
    m = re.search(pattern, text)
    try:
        value = float(m.group(1) if m.groups() else m.group(0)) if m else math.nan
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def estimate_tokens(text: str, max_new_tokens: int) -> int:
    return len(text) // 4 + 1 + max_new_tokens


# ------------------------------------------------------------------ circuit breaker


class Breaker:
    """Opens after `failures` failed attempts in a row that span at least `after_s` seconds
    without a success; while open every call fails at once. After `cooldown_s` calls go
    through again (half-open): a success closes it, the first failure opens it again at once.

    Why the span: with many requests in flight, failures come back faster than successes (a
    429 is answered at once, a verdict takes a forward pass), so a few injected faults can
    finish one after another while the endpoint is healthy. An outage fails for longer."""

    def __init__(self, failures: int, cooldown_s: float, endpoint: str, after_s: float = 0.0,
                 clock=time.monotonic):
        self.failures, self.cooldown_s, self.endpoint, self.after_s = failures, cooldown_s, endpoint, after_s
        self.clock = clock
        self.streak, self.first_failed_at, self.opened_at, self.last = 0, 0.0, None, ""
        self.trips = 0

    def check(self) -> None:
        if self.opened_at is not None and self.clock() - self.opened_at < self.cooldown_s:
            raise JudgeError(f"judge endpoint {self.endpoint}: {self.streak} failed attempts in a row "
                             f"(last: {self.last}); the circuit breaker is open. Fix the endpoint, then run "
                             f"again with --resume: every pair judged so far is kept")

    def failed(self, why: str) -> None:
        now = self.clock()
        if self.streak == 0:
            self.first_failed_at = now
        self.streak += 1
        self.last = why
        if self.opened_at is not None or (self.streak >= self.failures and now - self.first_failed_at >= self.after_s):
            self.trips += self.opened_at is None
            self.opened_at = now

    def succeeded(self) -> None:
        self.streak, self.opened_at = 0, None


# ------------------------------------------------------------------ verdict cache


class VerdictCache:
    """Answers already paid for, keyed by (judge model, API, max_new_tokens, template, prompt,
    response A, response B, order), or for a rubric (..., template, prompt, response), in append-only
    JSONL files under `folder`, one per writing process: replicas never interleave lines.
    A line cut short by a kill is skipped and counted (`skipped`), never fatal."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.entries: dict[str, dict] = {}
        self.skipped = 0
        for f in sorted(self.folder.glob("answers-*.jsonl")):
            for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                    self.entries[row["key"]] = {k: row[k] for k in ("text", "prompt_tokens", "completion_tokens")}
                except (ValueError, KeyError, TypeError):
                    self.skipped += 1
        self.path = self.folder / f"answers-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._file = None

    @staticmethod
    def key(*parts: str) -> str:
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, value: dict) -> None:
        self.entries[key] = value
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps({"key": key, **value}) + "\n")
        self._file.flush()


# ------------------------------------------------------------------ the requests


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0  # requests sent for it (0: from the cache)
    cached: bool = False
    refused: bool = False  # the endpoint refused this request (ITEM_STATUS): read as unparseable, never cached


def retry_after(headers) -> float | None:
    """Seconds from Retry-After-Ms / Retry-After (seconds or an HTTP date), if the server sent one."""
    try:
        if headers.get("retry-after-ms"):
            ms = float(headers["retry-after-ms"])
            return ms / 1000.0 if math.isfinite(ms) and ms >= 0 else None
        value = headers.get("retry-after")
        if not value:
            return None
        if re.fullmatch(r"\s*\d+(\.\d+)?\s*", value):  # digits only: never nan or inf
            return float(value)
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class RemoteJudgeCore:
    """The requests of one replica. `pace(tokens) -> delay s` and `settle(extra tokens)` are
    the shared schedule (a Pacer, or the Ray actor holding one); None: no rate limit."""

    def __init__(self, s: RemoteSettings, api_key: str | None, pace=None, settle=None):
        import openai

        self.s, self.pace, self.settle = s, pace, settle
        self.client = openai.AsyncOpenAI(base_url=s.base_url, api_key=api_key or "none", max_retries=0,
                                         timeout=s.timeout_s)
        self.slots = asyncio.Semaphore(s.max_concurrency)
        self.breaker = Breaker(s.breaker_failures, s.breaker_cooldown_s, s.base_url, s.breaker_after_s)
        self.cache = VerdictCache(s.cache_dir) if s.cache_dir else None
        self.counts: Counter = Counter()
        if self.cache is not None and self.cache.skipped:  # unreadable cache lines: counted, shown in /v1/judge
            self.counts["cache_lines_skipped"] = self.cache.skipped
        self.answers = dict(s.answers)
        self._inflight: dict = {}

    async def ask(self, text: str, key: str | None) -> Answer:
        """The judge model's answer to `text`: from the cache, or by request (and cached)."""
        hit = self.cache.get(key) if self.cache is not None and key else None
        if hit is None and key is not None and key in self._inflight:  # asked twice at once: ask once
            hit = await asyncio.shield(self._inflight[key])
            hit = None if hit.refused else hit.__dict__
        if hit is not None:
            self.counts["cache_hits"] += 1
            return Answer(hit["text"], hit["prompt_tokens"], hit["completion_tokens"], 0, True)
        future = asyncio.get_running_loop().create_future()
        if key is not None:
            self._inflight[key] = future
        try:
            answer = await self._request(text)
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: a failure with no second asker is not "never retrieved"
            raise
        finally:
            self._inflight.pop(key, None)
        future.set_result(answer)
        self.counts["cache_misses"] += 1
        if self.cache is not None and key and not answer.refused:
            self.cache.put(key, {"text": answer.text, "prompt_tokens": answer.prompt_tokens,
                                 "completion_tokens": answer.completion_tokens})
        return answer

    async def _request(self, text: str) -> Answer:
        import openai

        s, attempt = self.s, 0
        while True:
            self.breaker.check()
            attempt += 1
            async with self.slots:
                if self.pace is not None:
                    delay = await self.pace(estimate_tokens(text, s.max_new_tokens))
                    if delay > 0:
                        await asyncio.sleep(delay)
                self.breaker.check()  # it may have opened while this one waited
                self.counts["requests"] += 1
                wait = None
                try:
                    answer = await self._post(text, attempt)
                except openai.APIStatusError as e:
                    code = e.status_code
                    if code in ITEM_STATUS:  # the same every time: no retry, and the run goes on
                        self.counts[f"refused_{code}"] += 1
                        self.breaker.succeeded()  # the endpoint answered
                        return Answer("", attempts=attempt, refused=True)
                    if code not in RETRY_STATUS and code < 500:
                        self.counts[f"status_{code}"] += 1
                        raise JudgeError(self._refused(code, e)) from None
                    why, wait = f"HTTP {code}", retry_after(e.response.headers)
                except openai.APITimeoutError:
                    why = f"no answer within judge.remote.timeout_s={s.timeout_s:g}"
                except openai.APIConnectionError as e:
                    why = f"connection failed ({type(e.__cause__ or e).__name__})"
                except (openai.APIError, IndexError, AttributeError) as e:  # a 200 without a usable answer
                    why = f"malformed answer ({type(e).__name__})"
                else:
                    self.breaker.succeeded()
                    return answer
            self.breaker.failed(why)
            self.counts["failed_" + why.split(" (")[0].split(" within")[0].replace(" ", "_").lower()] += 1
            if attempt > s.max_retries:
                raise JudgeError(f"judge endpoint {s.base_url}: no answer after {attempt} attempts (last: {why}); "
                                 f"raise judge.remote.max_retries or fix the endpoint, then run again with --resume")
            self.counts["retries"] += 1
            backoff = min(s.max_backoff_s, s.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            await asyncio.sleep(min(wait, MAX_RETRY_AFTER_S) if wait is not None else backoff)

    async def _post(self, text: str, attempt: int) -> Answer:
        s = self.s
        if s.api == "chat":
            r = await self.client.chat.completions.create(model=s.model, messages=[{"role": "user", "content": text}],
                                                          max_tokens=s.max_new_tokens, temperature=0.0)
            out = r.choices[0].message.content or ""
        else:
            r = await self.client.completions.create(model=s.model, prompt=text, max_tokens=s.max_new_tokens,
                                                     temperature=0.0)
            out = r.choices[0].text
        used = r.usage
        answer = Answer(out, used.prompt_tokens if used else 0, used.completion_tokens if used else 0, attempt)
        if used is None:
            self.counts["usage_missing"] += 1
        elif self.settle is not None:
            try:  # pacing is best effort; the answer is paid for and must not be lost over it
                await self.settle(used.prompt_tokens + used.completion_tokens - estimate_tokens(text, s.max_new_tokens))
            except Exception:
                self.counts["settle_failed"] += 1
        return answer

    def _refused(self, code: int, e) -> str:
        hint = ""
        if code in (401, 403):
            hint = (f"; the key is read from ${self.s.api_key_env}" if self.s.api_key_env
                    else "; judge.remote.api_key_env names no key")
        elif code == 404:
            hint = f"; is judge.remote.model={self.s.model!r} served there, and judge.remote.api={self.s.api!r} right?"
        # a 401/403 body may echo part of the key (OpenAI's shows its last characters): not shown
        body = "" if code in (401, 403) else str(getattr(e, "message", "") or "")[:300]
        return f"judge endpoint {self.s.base_url} refused the request with HTTP {code}: {body}{hint}"

    # ------------------------------------------------------------ verdicts

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.s.price_prompt_per_1k + completion_tokens * self.s.price_completion_per_1k) / 1000

    async def compare(self, prompt: str, a: str, b: str) -> Judgement:
        """Asked as (A, B) and as (B, A), concurrently; agreement is a preference, disagreement
        a tie, an unparseable answer in either order "invalid" (`combine_both_orders`)."""
        template = self.s.template or DEFAULT_TEMPLATE
        texts = [render_judge_prompt(template, prompt, a, b), render_judge_prompt(template, prompt, b, a)]
        keys = [VerdictCache.key(*self._asked(), template, prompt, x, y, order)
                for x, y, order in ((a, b, "ab"), (b, a, "ba"))]
        got = await asyncio.gather(*(self.ask(t, k) for t, k in zip(texts, keys)))
        parsed = tuple(parse_verdict(g.text, self.s.answer_pattern, self.answers) for g in got)
        preferred = combine_both_orders(*parsed)
        return Judgement(preferred, {"a": 1.0, "b": -1.0}.get(preferred, 0.0), answers=tuple(g.text for g in got),
                         parsed=parsed, **self._usage(got))

    async def score(self, prompt: str, response: str) -> tuple[float, dict]:
        """A rubric score (NaN when the answer holds no number), and the usage it cost."""
        template = self.s.template or DEFAULT_RUBRIC
        text = template.format(prompt=prompt, response=response)
        got = await self.ask(text, VerdictCache.key(*self._asked(), template, prompt, response))
        return parse_score(got.text, self.s.answer_pattern), self._usage([got])

    def _asked(self) -> tuple[str, str, str]:
        """What else decides an answer, besides the rendered question: model, API, answer length.
        Not base_url: the same model behind another address (an outage's fix) keeps its cache."""
        return self.s.model, self.s.api, str(self.s.max_new_tokens)

    def _usage(self, got: list[Answer]) -> dict:
        p, c = sum(g.prompt_tokens for g in got if not g.cached), sum(g.completion_tokens for g in got if not g.cached)
        return {"calls": sum(not g.cached for g in got), "cached": sum(g.cached for g in got),
                "retries": sum(max(0, g.attempts - 1) for g in got), "prompt_tokens": p, "completion_tokens": c,
                "cost": self.cost(p, c)}
