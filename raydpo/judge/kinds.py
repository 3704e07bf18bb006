"""The judge kinds: the one place that says which Serve app a `judge.kind` deploys and
with which arguments. Adding a judge kind is one entry here (plus its app).

Importing this module imports neither Ray nor Serve: `raydpo.config` checks
`judge.kind` against `KINDS`, and the apps are imported only by `deploy`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class JudgeKind:
    app: str  # "module:function" building the Serve application from app args
    app_args: Callable  # (cfg, judge cfg with absolute paths) -> app args
    needs_model_path: bool = False
    generates: bool = False  # its model folder runs in vLLM (checked as the sampler's is) and pads nothing


def _rule_args(cfg, j) -> dict:
    return {"rule": j.rule, "tie_margin": j.tie_margin}


def _reward_model_args(cfg, j) -> dict:
    return {"reward_model": j.model_path, "tie_margin": j.tie_margin, "max_prompt_length": cfg.data.max_prompt_length,
            "max_length": cfg.data.max_length}


def _llm_args(cfg, j) -> dict:
    return {"model_path": j.model_path, "template": j.template, "answer_pattern": j.answer_pattern,
            "answers": j.answers, "max_new_tokens": j.max_new_tokens, "max_model_len": cfg.sampler.max_model_len,
            "kv_cache_gib": cfg.sampler.kv_cache_gib, "trust_remote_code": cfg.model.trust_remote_code}


def _remote_args(cfg, j) -> dict:
    import os
    from pathlib import Path

    from raydpo.config_io import require
    from raydpo.errors import ConfigError
    from raydpo.judge.remote import DEFAULT_SCORE_PATTERN
    from raydpo.judge.rules import DEFAULT_TEMPLATE, RUBRIC_FIELDS, check_template

    r = j.remote
    require(cfg, "judge.remote.base_url", "judge.remote.model", by="judge.kind=openai")
    if r.api_key_env and not os.environ.get(r.api_key_env):
        raise ConfigError(f"judge.remote.api_key_env={r.api_key_env}: that environment variable is not set here; "
                          f"export it (the judge replicas read it), or set judge.remote.api_key_env=null for an "
                          f"endpoint without a key")
    pattern = j.answer_pattern
    try:
        if r.mode == "pairwise":
            check_template(j.template or DEFAULT_TEMPLATE)
        elif j.template:  # a pointwise judge's rubric (None: DEFAULT_RUBRIC)
            check_template(j.template, RUBRIC_FIELDS, key="judge.template (a pointwise rubric, judge.remote.mode=pointwise)")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if r.mode == "pointwise" and pattern == type(j).model_fields["answer_pattern"].default:
        pattern = DEFAULT_SCORE_PATTERN
    template = j.template or (DEFAULT_TEMPLATE if r.mode == "pairwise" else None)  # pointwise: DEFAULT_RUBRIC
    settings = {**r.model_dump(exclude={"cache"}), "template": template,
                "answer_pattern": pattern, "answers": sorted(j.answers.items()), "max_new_tokens": j.max_new_tokens,
                "cache_dir": str(Path(cfg.run_dir).resolve() / "judge_cache") if r.cache else None,
                "tie_margin": j.tie_margin}
    return {"settings": settings}


KINDS: dict[str, JudgeKind] = {
    "rule": JudgeKind("raydpo.judge.apps:build_app", _rule_args),
    "reward_model": JudgeKind("raydpo.judge.apps:build_app", _reward_model_args, needs_model_path=True),
    "llm": JudgeKind("raydpo.judge.llm:build_app", _llm_args, needs_model_path=True, generates=True),
    "openai": JudgeKind("raydpo.judge.remote_app:build_app", _remote_args),
}


def build(cfg):
    """The Serve application of cfg.judge, sized by cluster.judge."""
    from raydpo.cluster import outliving_path
    from raydpo.config_io import require
    from raydpo.errors import ConfigError, RaydpoError

    j, res = cfg.judge, cfg.cluster.judge
    kind = KINDS[j.kind]
    if kind.needs_model_path:
        require(cfg, "judge.model_path", by=f"judge.kind={j.kind}")
        # the judge app outlives this job, and its replicas run elsewhere: an absolute path
        j = j.model_copy(update={"model_path": str(outliving_path(j.model_path, "judge.model_path"))})
        from raydpo.model_check import check_model_folder

        check_model_folder(j.model_path, sampled_on_cpu=kind.generates and not res.gpus,
                           trust_remote_code=cfg.model.trust_remote_code, key="judge.model_path",
                           needs_pad=not kind.generates)
    module, _, fn = kind.app.partition(":")
    builder = getattr(importlib.import_module(module), fn)
    try:
        return builder({**kind.app_args(cfg, j), "num_cpus": res.cpus, "resources": dict(res.resources),
                        **res.serve_scaling()})
    except ValueError as e:  # the builders' argument checks, which `serve run` shows as they are
        if isinstance(e, RaydpoError):
            raise
        raise ConfigError(f"judge.kind={j.kind}: {e}") from None


def deploy(cfg, name: str = "judge"):
    """The judge on Ray Serve (HTTP on cluster.host:port/<name>), and its deployment handle for the loop."""
    from ray import serve

    from raydpo import console

    console.quiet("ray.serve")  # a line per start-up and per application otherwise
    app = build(cfg)
    # one HTTP proxy, on the head: the endpoints' URLs name cluster.host, and proxies on
    # every node (Serve's default) would fight over one port when nodes share a machine
    serve.start(http_options={"host": cfg.cluster.host, "port": cfg.cluster.port}, proxy_location="HeadOnly")
    return serve.run(app, name=name, route_prefix=f"/{name}")
