"""sampler.weight_transport=nccl: the trainer broadcasts each new policy straight into the
sampler engines with vLLM's own NCCL weight transfer, instead of through the object store.

GPU only, and NEVER RUN: our machines have no GPU, and NCCL has no CPU backend. What runs
here is `PolicySource` (what is sent, checked against what the object-store route sends,
in tests/test_weights.py); the rest is vLLM 0.32's API as documented in
`vllm.distributed.weight_transfer`:

* rank 0 of the trainer opens the NCCL group as its rank 0; every engine's workers join at
  ranks 1.. (`NCCLTrainerWeightTransferEngine.trainer_init`, driving the engines'
  `init_weight_transfer_engine` through `RayVLLMWeightSyncClient`, which calls
  `raydpo.sampler.actor.SamplerActor`'s methods of those names; each engine offsets its
  workers' ranks by its slot, since vLLM would rank every standalone engine alike);
* tied heads an engine has no module for are not sent (as on the object-store route);
* each publish is `send_weights()`: start, broadcast every tensor, finish, on every engine;
  the pool then labels the engines with the version (`SamplerPool.publish(sent=True)`);
* when the pool replaced an engine, the group is built again with the current engines;
* ZeRO-3 ranks iterate the same buckets (the gathers are collective); only rank 0 sends.
"""

from __future__ import annotations

from collections.abc import Iterator


def policy_source(learner, bucket_bytes: int, skip: frozenset = frozenset()):
    """A vLLM `WeightSource` over the learner's policy: the names, dtypes and shapes of
    `Learner.weight_buckets` (the engines' names), then its tensors in the same order;
    without `skip` (tied heads the engines have no module for, as the object-store route)."""
    import torch
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    from raydpo.weights import checkpoint_names

    class PolicySource(WeightSource):
        def metadata(self) -> list[ParamMeta]:
            names = checkpoint_names(learner.unwrapped)
            return [ParamMeta(names.get(k, k), v.dtype, tuple(getattr(v, "ds_shape", v.shape)))
                    for k, v in learner.unwrapped.state_dict(keep_vars=True).items() if names.get(k, k) not in skip]

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            for part in learner.weight_buckets(bucket_bytes):  # every rank iterates all (ZeRO-3 gathers)
                yield from ((k, v) for k, v in part.items() if k not in skip)

    return PolicySource()


class NcclSender:
    """One trainer rank's side of the transfer group (see the module docstring)."""

    def __init__(self, learner, bucket_bytes: int, ranks_per_engine: int):
        self.learner, self.bucket_bytes, self.ranks_per_engine = learner, bucket_bytes, ranks_per_engine
        self.engine = None
        self.handles: tuple = ()

    def send(self, handles: tuple) -> None:
        if self.engine is None or handles != self.handles:
            self._join(handles)
        self.engine.send_weights()

    def _join(self, handles: tuple) -> None:
        import ray
        from vllm.distributed.weight_transfer.clients import RayVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        from raydpo.cluster import free_port

        self.close()
        skip = frozenset(ray.get(handles[0].heads_skipped.remote(), timeout=120))  # the engines share one model
        info = NCCLTrainerInitInfo(master_address=ray.util.get_node_ip_address(), master_port=free_port("0.0.0.0"),
                                   world_size=1 + len(handles) * self.ranks_per_engine, rank=self.learner.rank)
        self.engine = NCCLTrainerWeightTransferEngine.trainer_init(
            info, client=RayVLLMWeightSyncClient(list(handles)), source=policy_source(self.learner, self.bucket_bytes, skip))
        self.handles = handles

    def close(self) -> None:
        """Leave the group; engines that are gone are skipped."""
        import ray

        if self.engine is not None:
            self.engine.shutdown()
            for h in self.handles if self.learner.rank == 0 else ():
                try:
                    ray.get(h.shutdown_weight_transfer_engine.remote(), timeout=60)
                except Exception:  # noqa: BLE001  (a dead or replaced engine has nothing to shut down)
                    pass
        self.engine, self.handles = None, ()
