"""The remote judge on Ray Serve (`judge.kind=openai`): the same handle API and HTTP
routes as the other judges, answered by a model behind any OpenAI-compatible endpoint.

    POST /judge/v1/compare  {"items": [{"prompt": "...", "response_a": "...", "response_b": "..."}]}
    POST /judge/v1/score    {"items": [{"prompt": "...", "response": "..."}]}   (mode=pointwise)
    GET  /judge/v1/judge    -> identity, and this replica's request, retry and cache counts

What happens to each request (cache, pacing, retries, circuit breaker) is
`raydpo.judge.remote`. The requests- and tokens-per-minute schedule is one `PacerActor`
shared by every replica of every judge on the same endpoint and model (a detached actor,
named after them). The endpoint's key is read on each replica from the environment
variable named by `api_key_env`; it is never an argument, so it never reaches Serve's
config, a log line or a file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import time

import ray
from fastapi import FastAPI, Request
from ray import serve

from raydpo.errors import JudgeError
from raydpo.http import HTTPProblem, api_key, check_args, judge_error, read_request, replica_options, serve_scale
from raydpo.judge.apps import API_KEY_ENV, CompareRequest, ScoreRequest
from raydpo.judge.remote import Pacer, RemoteJudgeCore, RemoteSettings
from raydpo.records import JudgeInfo, Judgement

app = FastAPI(title="raydpo remote judge", docs_url=None, redoc_url=None)


@ray.remote(num_cpus=0)
class PacerActor:
    """One Pacer for every replica: answers with the delay before a request may start."""

    def __init__(self, requests_per_minute: float, tokens_per_minute: float):
        self.pacer = Pacer(requests_per_minute, tokens_per_minute)

    def reserve(self, tokens: int) -> float:
        now = time.time()
        return self.pacer.reserve(tokens, now) - now

    def settle(self, extra_tokens: int) -> None:
        self.pacer.settle(extra_tokens)


def shared_pacer(s: RemoteSettings):
    """The PacerActor of (endpoint, model, limits), created by the first replica that asks."""
    ident = hashlib.sha256(repr((s.base_url, s.model, s.requests_per_minute, s.tokens_per_minute)).encode())
    return PacerActor.options(name=f"raydpo-judge-pacer-{ident.hexdigest()[:16]}", namespace="raydpo",
                              lifetime="detached", get_if_exists=True).remote(s.requests_per_minute,
                                                                              s.tokens_per_minute)


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class RemoteJudge:
    def __init__(self, settings: dict):
        s = RemoteSettings(**{**settings, "answers": tuple(tuple(x) for x in settings.get("answers", ()))})
        key = os.environ.get(s.api_key_env) if s.api_key_env else None
        if s.api_key_env and not key:
            raise JudgeError(f"judge.remote.api_key_env={s.api_key_env}: that environment variable is not set "
                             f"where the judge replica runs")
        paced = s.requests_per_minute or s.tokens_per_minute
        actor = shared_pacer(s) if paced else None

        async def pace(tokens: int) -> float:
            return await actor.reserve.remote(tokens)

        async def settle(extra: int) -> None:
            await actor.settle.remote(extra)
        self.core = RemoteJudgeCore(s, key, pace if paced else None, settle if paced else None)
        self.info_ = JudgeInfo(f"openai:{s.model}", "openai", pairwise=s.mode == "pairwise",
                               tie_margin=s.tie_margin, costed=s.mode == "pointwise")
        self.api_key = api_key(API_KEY_ENV)  # raydpo's own bearer key on /judge, not the endpoint's

    # ------------------------------------------------------------ handle API (the loop)

    async def compare_items(self, items: list[tuple[str, str, str]]) -> list[Judgement]:
        compare = self.core.compare if self.info_.pairwise else self._compare_by_scores
        return list(await asyncio.gather(*(compare(p, a, b) for p, a, b in items)))

    async def _compare_by_scores(self, p: str, a: str, b: str) -> Judgement:
        """A rubric scorer compares by scores, as the scoring judges do (tie_margin included)."""
        from raydpo.judge.rules import compare_scores

        (sa, ua), (sb, ub) = await asyncio.gather(self.core.score(p, a), self.core.score(p, b))
        cost = {k: ua[k] + ub[k] for k in ua}
        if sa != sa or sb != sb:  # NaN: an answer without a score
            return Judgement("invalid", 0.0, sa, sb, **cost)
        return dataclasses.replace(compare_scores(sa, sb, self.core.s.tie_margin), **cost)

    async def score_items(self, items: list[tuple[str, str]]) -> list[float]:
        return [v for v, _ in await self.score_items_costed(items)]

    async def score_items_costed(self, items: list[tuple[str, str]]) -> list[tuple[float, dict]]:
        """(score, what it cost) per item: the loop counts a rubric judge's requests and tokens."""
        if self.info_.pairwise:
            raise JudgeError("this judge compares (judge.remote.mode=pairwise); it does not score one response")
        return list(await asyncio.gather(*(self.core.score(p, r) for p, r in items)))

    async def info(self) -> JudgeInfo:
        return self.info_

    async def stats(self) -> dict:
        return {**self.core.counts, "breaker_trips": self.core.breaker.trips}

    # ------------------------------------------------------------ HTTP

    @app.get("/v1/judge")
    async def identity(self) -> dict:
        s = self.core.s
        return {"judge": self.info_.name, **dataclasses.asdict(self.info_), "base_url": s.base_url, "api": s.api,
                "counts": await self.stats()}

    @app.post("/v1/compare")
    async def compare(self, request: Request):
        try:
            req = await read_request(request, CompareRequest, self.api_key)
            results = await self.compare_items([(it.prompt, it.response_a, it.response_b) for it in req.items])
        except HTTPProblem as e:
            return judge_error(e)
        except JudgeError as e:
            return judge_error(HTTPProblem(502, str(e)))
        return {"results": [dataclasses.asdict(r) for r in results], "judge": self.info_.name}

    @app.post("/v1/score")
    async def score(self, request: Request):
        try:
            req = await read_request(request, ScoreRequest, self.api_key)
            if self.info_.pairwise:
                raise HTTPProblem(400, "this is a pairwise judge: it compares two responses (POST /v1/compare)")
            scores = await self.score_items([(it.prompt, it.response) for it in req.items])
        except HTTPProblem as e:
            return judge_error(e)
        except JudgeError as e:
            return judge_error(HTTPProblem(502, str(e)))
        return {"scores": [None if v != v else v for v in scores], "judge": self.info_.name}


KNOWN_ARGS = {"settings", "num_replicas", "num_cpus", "autoscaling", "resources"}


def build_app(args: dict):
    """Application builder for `serve.run` (`raydpo.judge.kinds`) and `serve run` YAML."""
    check_args(args, KNOWN_ARGS, "remote judge")
    settings = dict(args.get("settings") or {})
    for key in ("base_url", "model"):
        if not settings.get(key):
            raise ValueError(f"remote judge app: settings.{key} is required")
    unknown = sorted(set(settings) - set(RemoteSettings.__dataclass_fields__))
    if unknown:
        raise ValueError(f"remote judge app: unknown settings {unknown}; known: "
                         f"{', '.join(RemoteSettings.__dataclass_fields__)}")
    from raydpo.judge.rules import DEFAULT_TEMPLATE, PAIRWISE_FIELDS, RUBRIC_FIELDS, check_template

    pairwise = settings.get("mode", "pairwise") == "pairwise"
    if pairwise or settings.get("template"):  # a bad template fails here, not at the first request
        check_template(settings.get("template") or DEFAULT_TEMPLATE, PAIRWISE_FIELDS if pairwise else RUBRIC_FIELDS,
                       key="settings.template")
    return RemoteJudge.options(ray_actor_options=replica_options(args, 0.25), **serve_scale(args)).bind(settings)
