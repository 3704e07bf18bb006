"""The one request guard of raydpo's HTTP apps (the judge and the policy endpoint).

`read_request` checks the bearer key and the body size, then validates the JSON body
with a strict pydantic model. Every problem is an `HTTPProblem` (status, message, the
field it is about); each app turns it into its own error shape with one function
(`judge_error` here; the policy app uses OpenAI's shape). A bad request is a 4xx and
never takes a replica down.
"""

from __future__ import annotations

import hmac
import os

from pydantic import BaseModel, ConfigDict, ValidationError

MAX_BODY_BYTES = 1 << 20


class StrictBody(BaseModel):
    """Request bodies: unknown fields and type coercions are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class HTTPProblem(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, problems: list[str] | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.problems, self.code = status, message, param, problems or [], code


def api_key(env_var: str) -> str | None:
    """The key an app requires (`Authorization: Bearer <key>`), from its environment; None: no key."""
    return os.environ.get(env_var) or None


async def read_body(request, key: str | None, limit: int = MAX_BODY_BYTES) -> bytes:
    """The raw body, after the API-key and size checks (HTTPProblem 401 / 413)."""
    if key:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise HTTPProblem(401, "missing or wrong API key (Authorization: Bearer <key>)")
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > limit:
        raise HTTPProblem(413, f"body of {size} bytes exceeds the limit of {limit}")
    body = await request.body()
    if len(body) > limit:
        raise HTTPProblem(413, f"body of {len(body)} bytes exceeds the limit of {limit}")
    return body


async def read_request(request, model: type[BaseModel], key: str | None, status: int = 422,
                       limit: int = MAX_BODY_BYTES):
    """The body validated as `model`; HTTPProblem naming every bad field (``items.3.response``)."""
    body = await read_body(request, key, limit)
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()]
        where = ".".join(str(p) for p in e.errors()[0]["loc"]) or "body"
        raise HTTPProblem(status, "; ".join(problems[:10]), param=where, problems=problems) from None


def judge_error(problem: HTTPProblem):
    """The judge apps' error shape: {"error": message, "problems": [...]}."""
    from fastapi.responses import JSONResponse

    content = {"error": problem.message}
    if problem.problems:
        content["problems"] = problem.problems
    return JSONResponse(status_code=problem.status, content=content)


def absolute_path_arg(args: dict, key: str, app: str) -> None:
    """Model folders in Serve app args must be absolute: each replica runs in a working
    directory of its own (on its own node), where a relative path means something else."""
    value = args.get(key)
    if value is not None and not os.path.isabs(str(value)):
        raise ValueError(f"{app} app: args.{key}={value!r} is relative; give an absolute path (on storage "
                         f"every replica's node sees), e.g. {os.path.abspath(str(value))}")


def check_args(args: dict, known: set[str], app: str) -> None:
    unknown = set(args) - known
    if unknown:
        raise ValueError(f"{app} app: unknown args {sorted(unknown)}; known: {sorted(known)}")


def replica_options(args: dict, cpus: float) -> dict:
    """A replica's ray_actor_options from app args: ``num_cpus`` (default `cpus`),
    ``num_gpus`` and ``resources`` (custom Ray resources that place it, e.g. on the head)."""
    options = {"num_cpus": float(args.get("num_cpus", cpus)), "num_gpus": float(args.get("num_gpus", 0))}
    resources = args.get("resources") or {}
    if not isinstance(resources, dict) or not all(isinstance(v, (int, float)) for v in resources.values()):
        raise ValueError(f"args.resources must map custom resource names to amounts, got {resources!r}")
    if resources:
        options["resources"] = {str(k): float(v) for k, v in resources.items()}
    return options


def serve_scale(args: dict) -> dict:
    """Deployment options from app args: ``autoscaling`` (min_replicas, max_replicas,
    target_ongoing_requests) replaces ``num_replicas``."""
    if args.get("autoscaling"):
        return {"autoscaling_config": dict(args["autoscaling"])}
    return {"num_replicas": int(args.get("num_replicas", 1))}
