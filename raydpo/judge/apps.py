"""The scoring judges on Ray Serve (a rule / verifier, or a reward model), reachable by HTTP and handle.

    serve run serve/judge_rule.yaml          # 127.0.0.1:8000/judge
    POST /judge/v1/score    {"items": [{"prompt": "...", "response": "..."}]}
    POST /judge/v1/compare  {"items": [{"prompt": "...", "response_a": "...", "response_b": "..."}]}
    GET  /judge/v1/judge    -> {"judge": "rule:raydpo.tasks.style:score", "kind": "rule", "pairwise": false, ...}

Bodies are validated with pydantic, bounded in size (bytes, items, characters),
and every problem is a 4xx whose message names the field (``items.3.response``);
a bad request never takes a replica down (`raydpo.http`). With the environment
variable RAYDPO_JUDGE_API_KEY set on the replicas, requests need ``Authorization:
Bearer <key>``. Items of concurrent requests are scored together through
``@serve.batch``; an item the rule cannot score fails alone, not its batch.
The pairwise LLM judge is `raydpo.judge.llm`; which app a judge kind deploys is
`raydpo.judge.kinds`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os

from fastapi import FastAPI, Request
from pydantic import Field
from ray import serve

from raydpo.errors import JudgeError
from raydpo.http import (HTTPProblem, StrictBody, absolute_path_arg, api_key, check_args, judge_error, read_request,
                         replica_options, serve_scale)
from raydpo.judge.rules import compare_scores, load_rule
from raydpo.records import JudgeInfo, Judgement

MAX_ITEMS = 256
MAX_CHARS = 32_768
API_KEY_ENV = "RAYDPO_JUDGE_API_KEY"


class ScoreItem(StrictBody):
    prompt: str = Field(min_length=1, max_length=MAX_CHARS)
    response: str = Field(min_length=1, max_length=MAX_CHARS)


class ScoreRequest(StrictBody):
    items: list[ScoreItem] = Field(min_length=1, max_length=MAX_ITEMS)


class CompareItem(StrictBody):
    prompt: str = Field(min_length=1, max_length=MAX_CHARS)
    response_a: str = Field(min_length=1, max_length=MAX_CHARS)
    response_b: str = Field(min_length=1, max_length=MAX_CHARS)


class CompareRequest(StrictBody):
    items: list[CompareItem] = Field(min_length=1, max_length=MAX_ITEMS)


app = FastAPI(title="raydpo judge", docs_url=None, redoc_url=None)


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(app)
class ScoringJudge:
    """A judge that scores: a rule (`module:function`) or a reward model."""

    def __init__(self, rule: str | None = "raydpo.tasks.style:score", tie_margin: float = 0.0,
                 max_batch_size: int = 64, reward_model: str | None = None, max_prompt_length: int = 128,
                 max_length: int = 192, num_threads: int = 1):
        if reward_model:
            from raydpo.judge.reward_model import RewardModelScorer

            name = f"reward_model:{os.path.basename(os.path.normpath(reward_model))}"
            self.info_ = JudgeInfo(name, "reward_model", pairwise=False, tie_margin=tie_margin)
            self.model_scorer = RewardModelScorer(reward_model, max_prompt_length, max_length, num_threads=num_threads)
            self.fn = None
        else:
            self.info_ = JudgeInfo(f"rule:{rule}", "rule", pairwise=False, tie_margin=tie_margin)
            self.fn, self.model_scorer = load_rule(rule), None
        self._score_many.set_max_batch_size(max_batch_size)  # 1 turns batching off
        self.tie_margin = tie_margin
        self.api_key = api_key(API_KEY_ENV)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _score_many(self, pairs: list[tuple[str, str]]) -> list[float | JudgeError]:
        """A score per item, or the JudgeError of an item that could not be scored (that item only)."""
        if self.model_scorer is not None:  # one forward pass for the whole batch, off the event loop
            try:
                return await asyncio.to_thread(self.model_scorer, list(pairs))
            except Exception as e:
                return [JudgeError(f"{type(e).__name__}: {e}")] * len(pairs)
        out: list[float | JudgeError] = []
        for prompt, response in pairs:
            try:
                out.append(float(self.fn(prompt, response)))
            except Exception as e:  # the rule's problem with this item, reported for this item only
                out.append(JudgeError(f"{type(e).__name__}: {e}"))
        return out

    async def _scores(self, pairs: list[tuple[str, str]], fields: list[str]) -> list[float]:
        results = await asyncio.gather(*(self._score_many(p) for p in pairs))
        for name, r in zip(fields, results):
            if isinstance(r, JudgeError):
                raise JudgeError(f"{name}: the judge cannot score it ({r})")
        return results

    # ------------------------------------------------ deployment-handle API
    # The online loop calls these through a DeploymentHandle (no HTTP, no JSON);
    # they go through the same @serve.batch path as the HTTP routes.

    async def score_items(self, items: list[tuple[str, str]]) -> list[float]:
        """Scores of (prompt, response) items; JudgeError names the first item the judge cannot score."""
        return await self._scores(list(items), [f"item {i}" for i in range(len(items))])

    async def compare_items(self, items: list[tuple[str, str, str]]) -> list[Judgement]:
        """Verdicts on (prompt, response_a, response_b) items."""
        pairs = [(p, r) for p, a, b in items for r in (a, b)]
        s = await self.score_items(pairs)
        return [compare_scores(s[2 * i], s[2 * i + 1], self.tie_margin) for i in range(len(items))]

    async def info(self) -> JudgeInfo:
        return self.info_

    # ------------------------------------------------ HTTP

    @app.get("/v1/judge")
    async def identity(self) -> dict:
        return {"judge": self.info_.name, **dataclasses.asdict(self.info_)}

    @app.post("/v1/score")
    async def score(self, request: Request):
        try:
            req = await read_request(request, ScoreRequest, self.api_key)
            scores = await self._scores([(it.prompt, it.response) for it in req.items],
                                        [f"items.{i}" for i in range(len(req.items))])
        except HTTPProblem as e:
            return judge_error(e)
        except JudgeError as e:
            return judge_error(HTTPProblem(422, str(e)))
        return {"scores": scores, "judge": self.info_.name}

    @app.post("/v1/compare")
    async def compare(self, request: Request):
        try:
            req = await read_request(request, CompareRequest, self.api_key)
            pairs, fields = [], []
            for i, it in enumerate(req.items):
                pairs += [(it.prompt, it.response_a), (it.prompt, it.response_b)]
                fields += [f"items.{i}.response_a", f"items.{i}.response_b"]
            s = await self._scores(pairs, fields)
        except HTTPProblem as e:
            return judge_error(e)
        except JudgeError as e:
            return judge_error(HTTPProblem(422, str(e)))
        results = [compare_scores(s[2 * i], s[2 * i + 1], self.tie_margin) for i in range(len(req.items))]
        return {"results": [dataclasses.asdict(r) for r in results], "judge": self.info_.name}


KNOWN_ARGS = {"rule", "tie_margin", "num_replicas", "num_cpus", "max_batch_size", "autoscaling", "reward_model",
              "max_prompt_length", "max_length", "resources"}


def build_app(args: dict):
    """Application builder for `serve run serve/judge_rule.yaml` (and `serve.run` from Python)."""
    check_args(args, KNOWN_ARGS, "judge")
    absolute_path_arg(args, "reward_model", "judge")
    options = replica_options(args, 0.5)
    cpus = options["num_cpus"]
    return ScoringJudge.options(ray_actor_options=options, **serve_scale(args)).bind(
        args.get("rule", "raydpo.tasks.style:score"), float(args.get("tie_margin", 0.0)),
        int(args.get("max_batch_size", 64)), args.get("reward_model"), int(args.get("max_prompt_length", 128)),
        int(args.get("max_length", 192)), max(1, int(cpus)))
