"""The loop's side of the policy app: deploy it with a registry, publish each new version,
wait until every replica serves it."""

from __future__ import annotations

import time

import ray
from ray import serve

from raydpo.cluster import on_this_node
from raydpo.policy.app import build_app
from raydpo.policy.registry import REGISTRY_NAMESPACE, PolicyRegistry


class PolicyEndpoint:
    """The loop's side: deploy the policy app with a registry, publish new weights,
    wait until every replica serves them."""

    _posted: int | None = None  # a version published without waiting for the replicas yet

    def __init__(self, cfg, model_path: str, name: str = "policy", route_prefix: str = "/policy"):
        self.registry_name = f"raydpo-policy-registry-{name}"
        # detached, like the app: on a long-lived cluster a later (resumed) run finds the
        # app and its registry from an earlier job, takes both over and resets the versions
        self.registry = ray.remote(num_cpus=0)(PolicyRegistry).options(
            name=self.registry_name, namespace=REGISTRY_NAMESPACE, lifetime="detached", get_if_exists=True,
            **on_this_node()).remote()
        ray.get(self.registry.reset.remote())
        r = cfg.cluster.policy
        self.replicas = r.count
        args = {"model_path": model_path, "registry": self.registry_name, **r.serve_scaling(), "num_cpus": r.cpus,
                "num_gpus": r.gpus, "resources": dict(r.resources), "max_model_len": cfg.sampler.max_model_len,
                "kv_cache_gib": cfg.sampler.kv_cache_gib, "dtype": cfg.model.dtype, "seed": cfg.seed,
                "trust_remote_code": cfg.model.trust_remote_code}
        serve.run(build_app(args), name=name, route_prefix=route_prefix)
        self.url = f"http://{cfg.cluster.host}:{cfg.cluster.port}{route_prefix}/v1"

    def publish(self, version: int, *, weights=None, path: str | None = None, timeout_s: float = 120,
                wait: bool = True) -> float:
        """Make every replica serve `version`; return the seconds this call took. Replicas take
        `weights` (`raydpo.weights.StoredWeights`, in the object store) when they can and
        `path` otherwise: give both, so that a replica started after this job ended (the
        owner of the weights' objects) can still load it.

        `wait=False` (the loop) returns once the version is posted: the replicas load it
        while the loop goes on, and the next publish, or `settle`, first waits for it and
        raises what a failed load left. The trainer then never waits for a Serve replica
        (0.35 s an iteration, measured), and a failure surfaces one publish later."""
        if weights is None and path is None:
            raise ValueError("publish needs weights or path")
        t = time.perf_counter()
        self.settle(timeout_s)
        ray.get(self.registry.publish.remote(version, [weights, path]))
        self._posted = version
        if wait:
            self.settle(timeout_s)
        return time.perf_counter() - t

    def settle(self, timeout_s: float = 120) -> None:
        """Wait until every replica serves the version published last (at once if they do)."""
        if self._posted is None:
            return
        version, t = self._posted, time.perf_counter()
        while True:
            serving = ray.get(self.registry.serving.remote())
            # replicas that autoscaling or a crash removed stay in `serving` at their old
            # version: count the ones that caught up
            if sum(v >= version for v in serving.values()) >= self.replicas:
                self._posted = None
                return
            if time.perf_counter() - t > timeout_s:
                errors = ray.get(self.registry.update_errors.remote())
                raise TimeoutError(f"policy app: replicas serve versions {serving} {timeout_s}s after "
                                   f"publishing {version}; update errors: {errors or 'none reported'}")
            time.sleep(0.1)
