"""The pairwise LLM judge on Ray Serve: a generative model (vLLM) asked which of two
responses is better, in both orders.

    POST /judge/v1/compare  {"items": [{"prompt": "...", "response_a": "...", "response_b": "..."}]}
    GET  /judge/v1/judge    -> identity and running counts (compared, ties, invalid)

Each item is rendered with the template twice, as (A, B) and as (B, A); both are
generated greedily in one batched vLLM call; each answer is parsed with
`answer_pattern` + `answers` (`raydpo.judge.parse_verdict`). Agreement across the
two orders is a preference (margin +1 / -1); disagreement, including a judge that
always names the first position, is a tie; an unparseable answer in either order
makes the item "invalid" and is counted, never turned into a default side.
`/v1/score` is a 400: a pairwise judge compares, it does not score (the loop
ranks k samples by round-robin comparisons instead; see `raydpo.online`).

Bodies are validated and bounded like the rule judge's (shared `parse_body`);
RAYDPO_JUDGE_API_KEY turns on the bearer key.
"""

from __future__ import annotations

import asyncio
import os
import threading

from fastapi import FastAPI, Request
from ray import serve

from raydpo.judge import (
    DEFAULT_ANSWER_PATTERN,
    DEFAULT_TEMPLATE,
    check_template,
    combine_both_orders,
    parse_verdict,
    render_judge_prompt,
)
from raydpo.serve_judge import CompareRequest, ScoreRequest, _error, absolute_path_arg, parse_body

app = FastAPI(title="raydpo LLM judge", docs_url=None, redoc_url=None)


@serve.deployment(max_ongoing_requests=32)
@serve.ingress(app)
class LLMJudge:
    def __init__(self, model_path: str, template: str | None = None, answer_pattern: str = DEFAULT_ANSWER_PATTERN,
                 answers: dict | None = None, max_new_tokens: int = 8, max_model_len: int = 512,
                 kv_cache_gib: float = 1.0, max_batch_size: int = 32, trust_remote_code: bool = False):
        from raydpo.vllm_engine import make_llm

        self.template = template or DEFAULT_TEMPLATE
        check_template(self.template)
        self.pattern, self.answers = answer_pattern, dict(answers or {"A": "a", "B": "b"})
        self.max_new_tokens, self.max_model_len = max_new_tokens, max_model_len
        self.llm = make_llm(model_path, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib, in_process=True,
                            trust_remote_code=trust_remote_code)
        self.tokenizer = self.llm.get_tokenizer()
        self.lock = threading.Lock()
        self.name = f"llm:{os.path.basename(os.path.normpath(model_path))}"
        self.counts = {"compared": 0, "a": 0, "b": 0, "tie": 0, "invalid": 0, "unparseable_answers": 0}
        self.api_key = os.environ.get("RAYDPO_JUDGE_API_KEY") or None
        self._judge_many.set_max_batch_size(max_batch_size)

    # ------------------------------------------------------------ judging

    def _fits(self, text: str) -> bool:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + self.max_new_tokens <= self.max_model_len

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _judge_many(self, items: list[tuple[str, str, str]]) -> list[dict]:
        return await asyncio.to_thread(self._judge_sync, items)

    def _judge_sync(self, items: list[tuple[str, str, str]]) -> list[dict]:
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
            results.append({"preferred": preferred, "margin": {"a": 1.0, "b": -1.0}.get(preferred, 0.0),
                            "score_a": None, "score_b": None,
                            "answers": [first_text, swapped_text], "parsed": [first, swapped]})
        return results

    # ------------------------------------------------------------ handle API (the loop)

    async def compare_items(self, items: list[tuple[str, str, str]]) -> list[dict]:
        for i, (p, a, b) in enumerate(items):
            if not self._fits(render_judge_prompt(self.template, p, a, b)):
                raise ValueError(f"item {i}: the judge prompt does not fit max_model_len {self.max_model_len}")
        return list(await asyncio.gather(*(self._judge_many(it) for it in items)))

    async def info(self) -> dict:
        return {"judge": self.name, "kind": "llm", "counts": dict(self.counts)}

    # ------------------------------------------------------------ HTTP

    @app.get("/v1/judge")
    async def identity(self) -> dict:
        return {"judge": self.name, "kind": "llm", "template": self.template, "answer_pattern": self.pattern,
                "counts": dict(self.counts)}

    @app.post("/v1/score")
    async def score(self, request: Request):
        req, err = await parse_body(request, ScoreRequest, self.api_key)
        if err:
            return err
        return _error(400, "this is a pairwise judge: it compares two responses (POST /v1/compare), it does not score one")

    @app.post("/v1/compare")
    async def compare(self, request: Request):
        req, err = await parse_body(request, CompareRequest, self.api_key)
        if err:
            return err
        items = [(it.prompt, it.response_a, it.response_b) for it in req.items]
        for i, (p, a, b) in enumerate(items):
            if not self._fits(render_judge_prompt(self.template, p, a, b)):
                return _error(413, f"items.{i}: the judge prompt exceeds the judge's context ({self.max_model_len} tokens)")
        results = await asyncio.gather(*(self._judge_many(it) for it in items))
        invalid = sum(r["preferred"] == "invalid" for r in results)
        return {"results": list(results), "invalid": invalid, "judge": self.name}


KNOWN_ARGS = {"model_path", "template", "answer_pattern", "answers", "max_new_tokens", "max_model_len", "kv_cache_gib",
              "num_replicas", "num_cpus", "max_batch_size", "autoscaling", "trust_remote_code"}


def build_app(args: dict):
    """Application builder for `serve run serve/judge_llm.yaml` and `serve.run`."""
    unknown = set(args) - KNOWN_ARGS
    if unknown:
        raise ValueError(f"LLM judge app: unknown args {sorted(unknown)}; known: {sorted(KNOWN_ARGS)}")
    if "model_path" not in args:
        raise ValueError("LLM judge app: args.model_path (an HF folder of a generative model) is required")
    absolute_path_arg(args, "model_path", "LLM judge")
    check_template(args.get("template") or DEFAULT_TEMPLATE)
    scale = ({"autoscaling_config": dict(args["autoscaling"])} if args.get("autoscaling")
             else {"num_replicas": int(args.get("num_replicas", 1))})
    return LLMJudge.options(ray_actor_options={"num_cpus": float(args.get("num_cpus", 1))}, **scale).bind(
        str(args["model_path"]), args.get("template"), str(args.get("answer_pattern", DEFAULT_ANSWER_PATTERN)),
        args.get("answers"), int(args.get("max_new_tokens", 8)), int(args.get("max_model_len", 512)),
        float(args.get("kv_cache_gib", 1.0)), int(args.get("max_batch_size", 32)),
        bool(args.get("trust_remote_code", False)))
