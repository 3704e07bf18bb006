"""The sampler role: a pool of vLLM engines in Ray actors (`raydpo.sampler.actor`).

`SamplerPool` spreads prompts over the actors in chunks, hands the next chunk to
whichever actor finishes first, replaces an actor that dies (bringing it to the
current weights version) and retries its chunk, and keeps exactly one result per
(prompt, sample). Every remote wait has a timeout and a failure names the actor
and the version.

Weight transport on CPU (the default, portable across nodes): the state dict goes into
the object store once, in buckets (`raydpo.weights.put_weights`), and every actor reads
every bucket (zero-copy on its node) into `reload_weights(weights_iterator=...)`.
`publish(path=...)` instead has each actor read a safetensors folder (storage
every node sees) and load it the same way. On GPUs, sampler.weight_transport=nccl has
the trainer broadcast into the engines with vLLM's weight-transfer API
(`raydpo.train.nccl_sync`) and `publish(sent=True)` only labels them; that path is
written but NEVER RUN: our machines have no GPU.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import ray

from raydpo.errors import SamplerError
from raydpo.records import Sample, SamplingSettings, Stale
from raydpo.sampler.actor import SamplerActor
from raydpo.weights import StoredWeights, buckets, put_weights


@dataclass
class PoolStats:
    restarts: int = 0  # actors replaced after dying
    retried_chunks: int = 0  # chunks re-run after their actor died
    stale_rejections: int = 0  # chunks refused by an actor below min_version
    held_s: float = 0.0  # seconds publishes waited for holds on the previous version (see SamplerPool.hold)
    weights_nodes: int = 0  # nodes holding the last published weights object (>1: it crossed nodes)


class SamplerPool:
    """N sampler actors behind one `sample()` and one `publish()`."""

    START_ATTEMPTS = 3  # an engine that dies before it is ready is started again, at most this often

    def __init__(self, model_path: str, num_engines: int = 1, *, cpus: float = 1, gpus: float = 0,
                 max_model_len: int = 256, kv_cache_gib: float = 1.0, dtype: str = "float32", seed: int = 0,
                 trust_remote_code: bool = False, tensor_parallel_size: int = 1, start_timeout_s: float = 300,
                 request_timeout_s: float = 600, sync_timeout_s: float = 120, cpu_ids: list[int] | None = None,
                 resources: dict[str, float] | None = None, sync_bucket_mb: int = 512,
                 weight_transport: str = "object_store"):
        self.model_path = str(Path(model_path).resolve())
        self._opts = dict(num_cpus=cpus, num_gpus=gpus, **({"resources": dict(resources)} if resources else {}))
        self._args = (max_model_len, kv_cache_gib, dtype, seed, "cuda" if gpus else "cpu", trust_remote_code,
                      tensor_parallel_size, cpu_ids, weight_transport)
        self.start_timeout_s, self.request_timeout_s, self.sync_timeout_s = start_timeout_s, request_timeout_s, sync_timeout_s
        self.sync_bucket_mb = sync_bucket_mb
        self.version = 0
        self._weights: tuple[int, StoredWeights | None, str | None] | None = None  # latest published
        self.stats = PoolStats()
        # One thread publishes; others may sample and hold meanwhile (the loop with
        # loop.max_staleness): the lock guards the actor slots, the condition the holds.
        self._lock = threading.RLock()
        self._holds: Counter[int] = Counter()
        self._released = threading.Condition(self._lock)
        self._streams = 0  # streams running now (other threads' chunks a load may queue behind)
        self.closed = False
        self.actors = [self._start(i) for i in range(num_engines)]
        try:
            self._wait_ready(range(num_engines))
        except SamplerError:
            for actor in self.actors:  # a pending one would otherwise wait for its resources forever
                ray.kill(actor)
            raise

    @classmethod
    def from_config(cls, cfg, model_path: str) -> SamplerPool:
        """A pool shaped by `cluster.sampler` (count, cpus, gpus) and `sampler.*` engine settings."""
        s, r = cfg.sampler, cfg.cluster.sampler
        return cls(model_path, r.count, cpus=r.cpus, gpus=r.gpus, max_model_len=s.max_model_len,
                   kv_cache_gib=s.kv_cache_gib, dtype=cfg.model.dtype, seed=cfg.seed,
                   trust_remote_code=cfg.model.trust_remote_code, tensor_parallel_size=s.tensor_parallel_size,
                   request_timeout_s=s.request_timeout_s, sync_timeout_s=s.sync_timeout_s, cpu_ids=r.cpu_ids,
                   resources=r.resources, start_timeout_s=s.start_timeout_s, sync_bucket_mb=s.sync_bucket_mb,
                   weight_transport=s.weight_transport)

    # ---------------------------------------------------------------- actors

    def _start(self, index: int):
        return SamplerActor.options(**self._opts).remote(self.model_path, index, *self._args)

    def _wait_ready(self, indices: Iterable[int]) -> None:
        """Until the engines in `indices` answer (they start in parallel). One that dies before
        it is ready, not by an error of its own but with its process or node, is started again
        within sampler.start_timeout_s: Ray sees a node lost only after missed heartbeats, and
        until then places new actors on it (measured: a replacement started 1 s after its
        node was killed went to that node, and died with it)."""
        deadline = time.monotonic() + self.start_timeout_s
        for i in indices:
            for attempt in range(1, self.START_ATTEMPTS + 1):
                try:
                    ray.get(self.actors[i].get_version.remote(), timeout=max(0.0, deadline - time.monotonic()))
                    break
                except ray.exceptions.GetTimeoutError:
                    raise SamplerError(f"sampler engines did not start within {self.start_timeout_s:g}s "
                                       f"(sampler.start_timeout_s){self._unplaceable()}") from None
                except ray.exceptions.RayActorError as e:
                    # its own error, or dying every time (out of memory, a crash): not a lost node
                    if e.actor_init_failed or attempt == self.START_ATTEMPTS or time.monotonic() >= deadline:
                        tries = f" (started {attempt} times)" if attempt > 1 else ""
                        raise SamplerError(f"sampler {i} failed to start{tries}: {e}") from None
                    self.actors[i] = self._start(i)

    def _unplaceable(self) -> str:
        """Why an engine may be waiting to be placed: the alive nodes lack what it reserves
        (its node died and has not come back, or the cluster never had it)."""
        from raydpo.cluster import fits_one_node

        shape = {"CPU": self._opts["num_cpus"], "GPU": self._opts["num_gpus"], **self._opts.get("resources", {})}
        if fits_one_node(shape, [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]):
            return ""
        wanted = ", ".join(f"{v:g} {k}" for k, v in shape.items() if v)
        return (f": no alive node has what one engine reserves ({wanted}); if its node died, start a node "
                f"with those resources (`ray start --address=... --resources=...`), then rerun with --resume: "
                f"every judged pair so far is kept")

    def _replace(self, index: int, dead=None) -> None:
        """Start a new actor in slot `index` and bring it to the current weights. `dead`: the
        handle seen dying; if another thread has replaced it meanwhile, nothing to do."""
        with self._lock:
            if self.closed:
                raise SamplerError("the sampler pool is shut down")
            if dead is not None and self.actors[index] is not dead:
                return
            self.stats.restarts += 1
            self.actors[index] = self._start(index)
            try:
                self._wait_ready([index])
            except SamplerError:
                ray.kill(self.actors[index])  # else it stays pending for its resources
                raise
            if self._weights:
                self._sync_one(index, *self._weights)

    def _sync_budget(self) -> float:
        """Seconds a load may take: while another thread streams, it queues behind that
        stream's running chunk (an actor runs one call at a time), so add a chunk's budget."""
        return self.sync_timeout_s + (self.request_timeout_s if self._streams else 0)

    def _await_sync(self, index: int, ref) -> None:
        """Wait for one actor's load_weights; SamplerError names the sampler and the cause."""
        budget = self._sync_budget()
        try:
            ray.get(ref, timeout=budget)
        except ray.exceptions.GetTimeoutError:
            raise SamplerError(f"sampler {index}: timed out after {budget:g}s") from None
        except ray.exceptions.RayTaskError as e:
            raise SamplerError(f"sampler {index}: {e.cause if e.cause else e}") from None

    def _sync_one(self, index: int, version: int, stored, path) -> None:
        try:
            self._await_sync(index, self.actors[index].load_weights.remote(version, stored, path))
        except SamplerError as e:
            raise SamplerError(f"weight sync to version {version} failed: {e}") from None

    # ---------------------------------------------------------------- weights

    def hold(self) -> int:
        """Keep every sampler on the current version until `release` of it: a `publish` of a
        newer one waits (evaluating version i while i+1 trains). Returns the version held."""
        with self._lock:
            self._holds[self.version] += 1
            return self.version

    def release(self, version: int) -> None:
        with self._lock:
            self._holds[version] -= 1
            if self._holds[version] <= 0:
                del self._holds[version]
            self._released.notify_all()

    def _wait_for_holds(self, version: int) -> None:
        t = time.perf_counter()
        with self._lock:
            # a held version is waiting for its eval samples: two streams, each within request_timeout_s
            if not self._released.wait_for(lambda: all(v >= version for v in self._holds), 2 * self.request_timeout_s):
                raise SamplerError(f"publishing version {version}: version(s) {sorted(self._holds)} still held "
                                   f"after {2 * self.request_timeout_s}s (2 x sampler.request_timeout_s)")
        self.stats.held_s += time.perf_counter() - t

    def publish(self, version: int, *, state_dict: dict | StoredWeights | None = None, path: str | None = None,
                sent: bool = False) -> float:
        """Bring every actor to `version`.

        `sent` (sampler.weight_transport=nccl, GPU only, never run here): the trainer has
        already broadcast the weights into the engines; label them `version`. An engine
        whose update did not finish is replaced and reads `path` (the checkpoint) instead.

        `state_dict`: torch tensors (put into the object store here, in buckets of
        `sync_bucket_mb`), or `StoredWeights` already there (as the online trainer returns
        them: no copy through the driver). Each actor fetches every bucket before it loads.

        Waits first while an older version is held (`hold`), and loads between sampling
        calls: an actor runs one call at a time, so no response mixes versions and every
        sample carries the version that produced it. Returns the loading seconds.

        All actors load in parallel. If any fails, SamplerError names it; actors
        that failed keep their previous weights (validated before loading), and
        the pool's version does not move, so callers can retry or stop.
        """
        if (state_dict is None) == (path is None):
            raise ValueError("publish() takes exactly one of state_dict= or path=")
        if sent and path is None:
            raise ValueError("publish(sent=True) needs the checkpoint path an engine that missed the broadcast reads")
        if version <= self.version:
            raise ValueError(f"publish(version={version}): versions must increase (current {self.version})")
        self._wait_for_holds(version)
        t = time.perf_counter()
        # One copy in the object store, as numpy arrays: Ray hands those to every actor
        # on the node zero-copy from shared memory (torch tensors would be copied).
        if isinstance(state_dict, StoredWeights) or state_dict is None:
            stored = state_dict
        else:
            stored = put_weights(buckets(state_dict.items(), self.sync_bucket_mb << 20))
        actors = list(self.actors)
        refs = [a.set_version.remote(version) if sent else a.load_weights.remote(version, stored, path) for a in actors]
        errors, loaded = [], []
        for i, ref in enumerate(refs):
            try:
                try:
                    self._await_sync(i, ref)
                except (ray.exceptions.RayActorError, SamplerError) as e:
                    if isinstance(e, SamplerError):
                        if not sent:
                            raise
                        ray.kill(actors[i])  # its broadcast did not finish: mixed weights, a new engine
                    self._replace(i, actors[i])  # comes back on the previous weights; load this version into it
                    self._await_sync(i, self.actors[i].load_weights.remote(version, stored, path))
                loaded.append(i)
            except SamplerError as e:
                errors.append(str(e))
        if errors:
            self._roll_back(loaded)
            raise SamplerError(f"weight sync to version {version} failed: " + "; ".join(errors)
                               + f"; every sampler is back on version {self.version}")
        self.version = version
        self._weights = (version, stored, path)
        if stored is not None:  # a statistic: it must not fail a publish that worked
            try:
                part = stored.parts[0]
                where = ray.experimental.get_object_locations([part], timeout_ms=5000).get(part)
                self.stats.weights_nodes = len(where["node_ids"]) if where else 0
            except Exception:  # noqa: BLE001  (the owner gone, a timeout)
                self.stats.weights_nodes = 0
        return time.perf_counter() - t

    def _roll_back(self, loaded: list[int]) -> None:
        """After a failed publish: every actor serves the pool's current version again, so no
        chunk mixes versions. Actors that loaded the new one load the previous weights back;
        an actor whose load broke part-way (version None) is replaced by a fresh engine."""
        refs = [a.get_version.remote() for a in self.actors]
        versions = []
        for ref in refs:  # one by one: a dead actor, or one still busy with a timed-out load, is replaced
            try:
                versions.append(ray.get(ref, timeout=self.sync_timeout_s))
            except (ray.exceptions.RayError, TimeoutError):
                versions.append(None)
        for i, v in enumerate(versions):
            if v is None:
                ray.kill(self.actors[i])
                self._replace(i)  # a fresh engine on the base weights, then the current version
            elif v != self.version:
                if self._weights:
                    self._sync_one(i, *self._weights)
                else:  # version 0 is the folder the pool started from
                    self._sync_one(i, 0, None, self.model_path)

    # ---------------------------------------------------------------- sampling

    def stream(self, prompts: Sequence[str], settings: SamplingSettings, min_version: int | None = None,
               chunk_size: int | None = None, seeds: Sequence[int] | None = None) -> Iterator[list[Sample]]:
        """Yield each chunk's samples as soon as that chunk finishes.

        Chunks go to whichever actor is free, so one slow actor does not stall the
        rest; a chunk whose actor dies is re-run on its replacement; a chunk an
        actor refuses as too old (below `min_version`, default: the pool's version)
        is counted, the actor brought up to date, and the chunk re-run. Every chunk
        is yielded exactly once. `seeds`: one per prompt (see `SamplerActor.generate`).
        """
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        min_version = self.version if min_version is None else min_version
        n_act = len(self.actors)
        # Two chunks per engine: big enough for vLLM's continuous batching (an engine
        # runs one call at a time), small enough that a dead actor costs half its share.
        chunk_size = chunk_size or max(1, -(-len(prompts) // (2 * n_act)))
        todo = deque(range(0, len(prompts), chunk_size))
        inflight: dict[ray.ObjectRef, tuple] = {}  # ref -> (actor slot, chunk start, actor)
        idle = deque(range(n_act))
        deadline = time.monotonic() + self.request_timeout_s

        def dispatch() -> None:
            while todo and idle:
                slot, start = idle.popleft(), todo.popleft()
                part = None if seeds is None else list(seeds[start:start + chunk_size])
                ref = self.actors[slot].generate.remote(prompts[start:start + chunk_size], start, settings, min_version,
                                                        part)
                inflight[ref] = (slot, start, self.actors[slot])

        with self._lock:
            self._streams += 1
        try:
            dispatch()
            while inflight:
                remaining = deadline - time.monotonic()
                done, _ = ray.wait(list(inflight), num_returns=1, timeout=max(0.0, remaining))
                if not done:
                    slots = sorted({v[0] for v in inflight.values()})
                    raise SamplerError(f"sampling timed out after {self.request_timeout_s}s; samplers {slots} still busy")
                slot, start, actor = inflight.pop(done[0])
                out = None
                try:
                    out = ray.get(done[0])
                except ray.exceptions.RayActorError:
                    self.stats.retried_chunks += 1
                    self._replace(slot, actor)
                    todo.appendleft(start)
                else:
                    if isinstance(out, Stale):  # the actor was below min_version
                        self.stats.stale_rejections += 1
                        if not self._weights or self._weights[0] < min_version:
                            raise SamplerError(f"min_version {min_version} was never published "
                                               f"(pool at {self.version})")
                        self._sync_one(slot, *self._weights)
                        todo.appendleft(start)
                        out = None
                idle.append(slot)
                dispatch()  # keep the actors busy before handing results to the caller
                if out is not None:
                    yield out
        finally:
            with self._lock:
                self._streams -= 1

    def sample(self, prompts: Sequence[str], settings: SamplingSettings, min_version: int | None = None,
               chunk_size: int | None = None, seeds: Sequence[int] | None = None) -> list[Sample]:
        """`settings.n` samples for each prompt, ordered by (prompt, sample); see `stream`."""
        out = [s for chunk in self.stream(prompts, settings, min_version, chunk_size, seeds) for s in chunk]
        return sorted(out, key=lambda s: (s.prompt_index, s.sample_index))

    def shutdown(self) -> None:
        self.closed = True  # a thread still sampling gets errors, not freshly started engines
        for a in self.actors:
            ray.kill(a)
