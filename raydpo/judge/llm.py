"""The pairwise LLM judge on Ray Serve: a generative model (vLLM) asked which of two
responses is better, in both orders.

    POST /judge/v1/compare  {"items": [{"prompt": "...", "response_a": "...", "response_b": "..."}]}
    GET  /judge/v1/judge    -> identity and running counts (compared, ties, invalid)

Each item is rendered with the template twice, as (A, B) and as (B, A); both are
generated greedily in one batched vLLM call; each answer is parsed with
`answer_pattern` + `answers` (`raydpo.judge.rules.parse_verdict`). Agreement across the
two orders is a preference (margin +1 / -1); disagreement, including a judge that
always names the first position, is a tie; an unparseable answer in either order
makes the item "invalid" and is counted, never turned into a default side.
`/v1/score` is a 400: a pairwise judge compares, it does not score (the loop
ranks k samples by round-robin comparisons instead; see `raydpo.judge.client`).

Bodies are validated and bounded like the rule judge's (`raydpo.http`);
RAYDPO_JUDGE_API_KEY turns on the bearer key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading

from fastapi import FastAPI, Request
from ray import serve

from raydpo.errors import JudgeError
from raydpo.http import (HTTPProblem, absolute_path_arg, api_key, check_args, judge_error, read_request, replica_options,
                         serve_scale)
from raydpo.judge.apps import API_KEY_ENV, CompareRequest, ScoreRequest
from raydpo.judge.rules import (DEFAULT_ANSWER_PATTERN, DEFAULT_TEMPLATE, check_template, combine_both_orders,
                                parse_verdict, render_judge_prompt)
from raydpo.records import JudgeInfo, Judgement

app = FastAPI(title="raydpo LLM judge", docs_url=None, redoc_url=None)


@serve.deployment(max_ongoing_requests=32)
@serve.ingress(app)
class LLMJudge:
    def __init__(self, model_path: str, template: str | None = None, answer_pattern: str = DEFAULT_ANSWER_PATTERN,
                 answers: dict | None = None, max_new_tokens: int = 8, max_model_len: int = 512,
                 kv_cache_gib: float = 1.0, max_batch_size: int = 32, trust_remote_code: bool = False):
        from raydpo.sampler.engine import make_llm

        self.template = template or DEFAULT_TEMPLATE
        check_template(self.template)
        self.pattern, self.answers = answer_pattern, dict(answers or {"A": "a", "B": "b"})
        self.max_new_tokens, self.max_model_len = max_new_tokens, max_model_len
        self.llm = make_llm(model_path, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib, in_process=True,
                            trust_remote_code=trust_remote_code)
        self.tokenizer = self.llm.get_tokenizer()
        self.lock = threading.Lock()
        self.info_ = JudgeInfo(f"llm:{os.path.basename(os.path.normpath(model_path))}", "llm", pairwise=True)
        self.counts = {"compared": 0, "a": 0, "b": 0, "tie": 0, "invalid": 0, "unparseable_answers": 0}
        self.api_key = api_key(API_KEY_ENV)
        self._judge_many.set_max_batch_size(max_batch_size)

    # ------------------------------------------------------------ judging

    def _fits(self, text: str) -> bool:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + self.max_new_tokens <= self.max_model_len

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _judge_many(self, items: list[tuple[str, str, str]]) -> list[Judgement]:
        return await asyncio.to_thread(self._judge_sync, items)

    def _judge_sync(self, items: list[tuple[str, str, str]]) -> list[Judgement]:
        from vllm import SamplingParams

        prompts = []
        for p, a, b in items:
            prompts += [render_judge_prompt(self.template, p, a, b), render_judge_prompt(self.template, p, b, a)]
        params = SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens)
        with self.lock:
            outs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for i in range(len(items)):
            first_text, swapped_text = outs[2 * i].outputs[0].text, outs[2 * i + 1].outputs[0].text
            first = parse_verdict(first_text, self.pattern, self.answers)
            swapped = parse_verdict(swapped_text, self.pattern, self.answers)
            preferred = combine_both_orders(first, swapped)
            self.counts["compared"] += 1
            self.counts[preferred] += 1
            self.counts["unparseable_answers"] += (first == "invalid") + (swapped == "invalid")
            results.append(Judgement(preferred, {"a": 1.0, "b": -1.0}.get(preferred, 0.0),
                                     answers=(first_text, swapped_text), parsed=(first, swapped)))
        return results

    # ------------------------------------------------------------ handle API (the loop)

    async def compare_items(self, items: list[tuple[str, str, str]]) -> list[Judgement]:
        for i, (p, a, b) in enumerate(items):
            if not self._fits(render_judge_prompt(self.template, p, a, b)):
                raise JudgeError(f"item {i}: the judge prompt does not fit max_model_len {self.max_model_len}")
        return list(await asyncio.gather(*(self._judge_many(it) for it in items)))

    async def info(self) -> JudgeInfo:
        return self.info_

    # ------------------------------------------------------------ HTTP

    @app.get("/v1/judge")
    async def identity(self) -> dict:
        return {"judge": self.info_.name, **dataclasses.asdict(self.info_), "template": self.template, "answer_pattern": self.pattern,
                "counts": dict(self.counts)}

    @app.post("/v1/score")
    async def score(self, request: Request):
        try:
            await read_request(request, ScoreRequest, self.api_key)
        except HTTPProblem as e:
            return judge_error(e)
        return judge_error(HTTPProblem(400, "this is a pairwise judge: it compares two responses "
                                            "(POST /v1/compare), it does not score one"))

    @app.post("/v1/compare")
    async def compare(self, request: Request):
        try:
            req = await read_request(request, CompareRequest, self.api_key)
        except HTTPProblem as e:
            return judge_error(e)
        items = [(it.prompt, it.response_a, it.response_b) for it in req.items]
        for i, (p, a, b) in enumerate(items):
            if not self._fits(render_judge_prompt(self.template, p, a, b)):
                return judge_error(HTTPProblem(413, f"items.{i}: the judge prompt exceeds the judge's context "
                                                    f"({self.max_model_len} tokens)"))
        results = await asyncio.gather(*(self._judge_many(it) for it in items))
        invalid = sum(r.preferred == "invalid" for r in results)
        return {"results": [dataclasses.asdict(r) for r in results], "invalid": invalid, "judge": self.info_.name}


KNOWN_ARGS = {"model_path", "template", "answer_pattern", "answers", "max_new_tokens", "max_model_len", "kv_cache_gib",
              "num_replicas", "num_cpus", "max_batch_size", "autoscaling", "trust_remote_code", "resources"}


def build_app(args: dict):
    """Application builder for `serve run serve/judge_llm.yaml` and `serve.run`."""
    check_args(args, KNOWN_ARGS, "LLM judge")
    if "model_path" not in args:
        raise ValueError("LLM judge app: args.model_path (an HF folder of a generative model) is required")
    absolute_path_arg(args, "model_path", "LLM judge")
    check_template(args.get("template") or DEFAULT_TEMPLATE)
    return LLMJudge.options(ray_actor_options=replica_options(args, 1), **serve_scale(args)).bind(
        str(args["model_path"]), args.get("template"), str(args.get("answer_pattern", DEFAULT_ANSWER_PATTERN)),
        args.get("answers"), int(args.get("max_new_tokens", 8)), int(args.get("max_model_len", 512)),
        float(args.get("kv_cache_gib", 1.0)), int(args.get("max_batch_size", 32)),
        bool(args.get("trust_remote_code", False)))
