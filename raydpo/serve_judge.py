"""The scoring judges on Ray Serve (rule / verifier, and reward model), reachable by HTTP and handle.

    serve run serve/judge_rule.yaml          # 127.0.0.1:8000/judge
    POST /judge/v1/score    {"items": [{"prompt": "...", "response": "..."}]}
    POST /judge/v1/compare  {"items": [{"prompt": "...", "response_a": "...", "response_b": "..."}]}
    GET  /judge/v1/judge    -> {"judge": "rule:raydpo.tasks.style:score"}

Bodies are validated with pydantic, bounded in size (bytes, items, characters),
and every problem is a 4xx whose message names the field (``items.3.response``);
a bad request never takes a replica down. With the environment variable
RAYDPO_JUDGE_API_KEY set on the replicas, requests need ``Authorization: Bearer
<key>``. Items of concurrent requests are scored together through
``@serve.batch``; an item the rule cannot score fails alone, not its batch.
The reward model is served with the app arg ``reward_model: <HF folder>`` (train one
with jobs/train_reward.py); the pairwise LLM judge is `raydpo.serve_llm_judge`.
"""

from __future__ import annotations

import asyncio
import hmac
import os

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from raydpo.judge import compare_scores, load_rule

MAX_BODY_BYTES = 1 << 20
MAX_ITEMS = 256
MAX_CHARS = 32_768


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ScoreItem(_Body):
    prompt: str = Field(min_length=1, max_length=MAX_CHARS)
    response: str = Field(min_length=1, max_length=MAX_CHARS)


class ScoreRequest(_Body):
    items: list[ScoreItem] = Field(min_length=1, max_length=MAX_ITEMS)


class CompareItem(_Body):
    prompt: str = Field(min_length=1, max_length=MAX_CHARS)
    response_a: str = Field(min_length=1, max_length=MAX_CHARS)
    response_b: str = Field(min_length=1, max_length=MAX_CHARS)


class CompareRequest(_Body):
    items: list[CompareItem] = Field(min_length=1, max_length=MAX_ITEMS)


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, **extra})


class _ItemError(Exception):
    pass


async def read_guarded_body(request: Request, api_key: str | None,
                            limit: int = MAX_BODY_BYTES) -> tuple[bytes | None, tuple[int, str] | None]:
    """The raw body after the API-key and size checks, or (None, (status, message)).
    Shared by every raydpo app; each wraps the problem in its own error shape."""
    if api_key:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            return None, (401, "missing or wrong API key (Authorization: Bearer <key>)")
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > limit:
        return None, (413, f"body of {size} bytes exceeds the limit of {limit}")
    body = await request.body()
    if len(body) > limit:
        return None, (413, f"body of {len(body)} bytes exceeds the limit of {limit}")
    return body, None


async def parse_body(request: Request, model: type[_Body], api_key: str | None):
    """(validated body, None) or (None, 4xx JSONResponse naming the problem). Shared by the judge apps."""
    body, problem = await read_guarded_body(request, api_key)
    if problem:
        return None, _error(*problem)
    try:
        return model.model_validate_json(body), None
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()]
        return None, _error(422, "; ".join(problems[:10]), problems=problems)


app = FastAPI(title="raydpo judge", docs_url=None, redoc_url=None)


class RewardModelScorer:
    """Scores (prompt, response) with a Bradley-Terry reward model (an HF
    sequence-classification folder, e.g. from jobs/train_reward.py), rendered and
    tokenized exactly as in training (text pairs: prompt, then response + EOS)."""

    def __init__(self, model_path: str, max_prompt_length: int = 128, max_length: int = 192,
                 trust_remote_code: bool = False, num_threads: int = 1):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(max(1, num_threads))  # Ray leaves torch at 1 thread; see raydpo.train.worker
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_path, dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{model_path}: a reward model has one output (num_labels=1), "
                             f"this one has {self.model.config.num_labels}")
        self.max_prompt_length, self.max_length = max_prompt_length, max_length

    def __call__(self, pairs: list[tuple[str, str]]) -> list[float]:
        import torch

        from raydpo.data.collate import collate_pairs
        from raydpo.data.tokenize import tokenize_batch
        from raydpo.train.step import sequence_rewards

        n = len(pairs)
        cols = {"prompt": [p for p, _ in pairs], "chosen": [r for _, r in pairs], "rejected": [r for _, r in pairs],
                "is_chat": [False] * n, "tools": [""] * n}
        batch = collate_pairs(tokenize_batch(cols, self.tokenizer, self.max_prompt_length, self.max_length),
                              self.tokenizer.pad_token_id)
        with torch.no_grad():  # the chosen half of the collated batch is the responses as given
            return sequence_rewards(self.model, batch["input_ids"][:n], batch["attention_mask"][:n]).tolist()


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(app)
class ScoringJudge:
    """A judge that scores: a rule (`module:function`) or a reward model."""

    def __init__(self, rule: str | None = "raydpo.tasks.style:score", tie_margin: float = 0.0,
                 max_batch_size: int = 64, reward_model: str | None = None, max_prompt_length: int = 128,
                 max_length: int = 192, num_threads: int = 1):
        if reward_model:
            self.kind, self.name = "reward_model", f"reward_model:{os.path.basename(os.path.normpath(reward_model))}"
            self.model_scorer = RewardModelScorer(reward_model, max_prompt_length, max_length, num_threads=num_threads)
            self.fn = None
        else:
            self.kind, self.name = "rule", f"rule:{rule}"
            self.fn, self.model_scorer = load_rule(rule), None
        self._score_many.set_max_batch_size(max_batch_size)  # 1 turns batching off
        self.tie_margin = tie_margin
        self.api_key = os.environ.get("RAYDPO_JUDGE_API_KEY") or None

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _score_many(self, pairs: list[tuple[str, str]]) -> list[float | str]:
        if self.model_scorer is not None:  # one forward pass for the whole batch, off the event loop
            try:
                return await asyncio.to_thread(self.model_scorer, list(pairs))
            except Exception as e:
                return [f"{type(e).__name__}: {e}"] * len(pairs)
        out: list[float | str] = []
        for prompt, response in pairs:
            try:
                out.append(float(self.fn(prompt, response)))
            except Exception as e:  # the rule's problem with this item, reported for this item only
                out.append(f"{type(e).__name__}: {e}")
        return out

    async def _scores(self, pairs: list[tuple[str, str]], fields: list[str]) -> list[float]:
        results = await asyncio.gather(*(self._score_many(p) for p in pairs))
        for field, r in zip(fields, results):
            if isinstance(r, str):
                raise _ItemError(f"{field}: the judge cannot score it ({r})")
        return results

    async def _parse(self, request: Request, model: type[_Body]):
        return await parse_body(request, model, self.api_key)

    @app.get("/v1/judge")
    async def identity(self) -> dict:
        return {"judge": self.name, "kind": self.kind}

    # ------------------------------------------------ deployment-handle API
    # The online loop calls these through a DeploymentHandle (no HTTP, no JSON);
    # they go through the same @serve.batch path as the HTTP routes.

    async def score_items(self, items: list[tuple[str, str]]) -> list[float]:
        """Scores of (prompt, response) items; ValueError names the first item the rule cannot score."""
        try:
            return await self._scores(list(items), [f"item {i}" for i in range(len(items))])
        except _ItemError as e:
            raise ValueError(str(e)) from None

    async def compare_items(self, items: list[tuple[str, str, str]]) -> list[dict]:
        """Verdicts on (prompt, response_a, response_b) items, as dicts (see raydpo.judge.Judgement)."""
        pairs = [(p, r) for p, a, b in items for r in (a, b)]
        s = await self.score_items(pairs)
        return [compare_scores(s[2 * i], s[2 * i + 1], self.tie_margin).__dict__ for i in range(len(items))]

    async def info(self) -> dict:
        return {"judge": self.name, "kind": self.kind, "tie_margin": self.tie_margin}

    @app.post("/v1/score")
    async def score(self, request: Request):
        req, err = await self._parse(request, ScoreRequest)
        if err:
            return err
        try:
            scores = await self._scores([(it.prompt, it.response) for it in req.items],
                                        [f"items.{i}" for i in range(len(req.items))])
        except _ItemError as e:
            return _error(422, str(e))
        return {"scores": scores, "judge": self.name}

    @app.post("/v1/compare")
    async def compare(self, request: Request):
        req, err = await self._parse(request, CompareRequest)
        if err:
            return err
        pairs, fields = [], []
        for i, it in enumerate(req.items):
            pairs += [(it.prompt, it.response_a), (it.prompt, it.response_b)]
            fields += [f"items.{i}.response_a", f"items.{i}.response_b"]
        try:
            s = await self._scores(pairs, fields)
        except _ItemError as e:
            return _error(422, str(e))
        results = [compare_scores(s[2 * i], s[2 * i + 1], self.tie_margin) for i in range(len(req.items))]
        return {"results": [r.__dict__ for r in results], "judge": self.name}


def absolute_path_arg(args: dict, key: str, app: str) -> None:
    """Model folders in Serve app args must be absolute: each replica runs in a working
    directory of its own (on its own node), where a relative path means something else."""
    value = args.get(key)
    if value is not None and not os.path.isabs(str(value)):
        raise ValueError(f"{app} app: args.{key}={value!r} is relative; give an absolute path (on storage "
                         f"every replica's node sees), e.g. {os.path.abspath(str(value))}")


def build_app(args: dict):
    """Application builder for `serve run serve/judge_rule.yaml` (and `serve.run` from Python)."""
    known = {"rule", "tie_margin", "num_replicas", "num_cpus", "max_batch_size", "autoscaling", "reward_model",
             "max_prompt_length", "max_length"}
    unknown = set(args) - known
    if unknown:
        raise ValueError(f"judge app: unknown args {sorted(unknown)}; known: {sorted(known)}")
    absolute_path_arg(args, "reward_model", "judge")
    # autoscaling: {min_replicas, max_replicas, target_ongoing_requests} replaces num_replicas
    scale = ({"autoscaling_config": dict(args["autoscaling"])} if args.get("autoscaling")
             else {"num_replicas": int(args.get("num_replicas", 1))})
    cpus = float(args.get("num_cpus", 0.5))
    return ScoringJudge.options(
        ray_actor_options={"num_cpus": cpus},
        **scale,
    ).bind(args.get("rule", "raydpo.tasks.style:score"), float(args.get("tie_margin", 0.0)),
           int(args.get("max_batch_size", 64)), args.get("reward_model"), int(args.get("max_prompt_length", 128)),
           int(args.get("max_length", 192)), max(1, int(cpus)))
