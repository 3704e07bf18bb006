"""One sampler: a vLLM engine in a Ray actor, token ids in and token ids out.

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0: about half the start-up
inside an actor, and weights arrive from the Ray object store as tensors). An actor
runs one call at a time (Ray's default for actors), so it never generates while its
weights are being replaced, and it validates every tensor's name and shape *before*
loading (`raydpo.weights.checked_update`), so a bad update cannot leave it
half-updated: it keeps serving the previous version.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import ray

from raydpo.errors import SamplerError
from raydpo.records import Sample, SamplingSettings, Stale, derive_seed
from raydpo.weights import StoredWeights, checked_update, checkpoint_shapes, engine_heads_missing, engine_tied_keys


def _failing_after(items, n: int):
    """Fault injection for tests: yield `n` tensors, then fail as a real loader error would."""
    yield from itertools.islice(items, n)
    raise RuntimeError(f"injected fault: weight load failed after {n} tensors")


@ray.remote
class SamplerActor:
    def __init__(self, model_path: str, index: int, max_model_len: int, kv_cache_gib: float, dtype: str,
                 seed: int, device: str, trust_remote_code: bool, tensor_parallel_size: int = 1,
                 cpu_ids: list[int] | None = None, weight_transport: str = "object_store"):
        from raydpo.cluster import pin_cpus, require_shared
        from raydpo.sampler.engine import make_llm

        require_shared(model_path, f"sampler {index}")
        pin_cpus(cpu_ids, "sampler")  # before the engine starts its threads

        self.index, self.tensor_parallel_size = index, tensor_parallel_size
        self.expected = checkpoint_shapes(model_path)
        self.tied = engine_tied_keys(model_path, trust_remote_code)
        self._fault_after: int | None = None
        self._received = False  # weight_transport=nccl: an update finished and not yet labelled
        self.llm = make_llm(model_path, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib, dtype=dtype,
                            seed=seed, in_process=True, device=device, trust_remote_code=trust_remote_code,
                            tensor_parallel_size=tensor_parallel_size,
                            weight_transfer="nccl" if weight_transport == "nccl" else None)
        self.skip = engine_heads_missing(self.llm, self.tied)
        from transformers import AutoTokenizer

        from raydpo.data.tokenize import special_prefix

        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.prefix = special_prefix(self.tokenizer)
        self.version: int | None = 0  # None: a load failed part-way, the weights are mixed
        self._warm_up()

    def _warm_up(self) -> None:
        """Compile vLLM's log-prob kernel now, not in the first call that asks for log-probs.

        vLLM 0.32 ranks each sampled token with a torch.compile'd function
        (`batched_count_greater_than`, its batch dimension dynamic), compiled on first use:
        ~2 s on 2 cores, which the first training chunk paid inside the loop once the
        evaluation stopped asking for log-probs. One token of one request compiles it."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from raydpo.data.tokenize import encode_prompts

        ids = encode_prompts(self.tokenizer, ["warm up"], self.prefix)[0]
        self.llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, logprobs=0, seed=0),
                          use_tqdm=False)

    def get_version(self) -> int:
        return self.version

    def load_weights(self, version: int, state: dict | None = None, path: str | None = None) -> int:
        """Replace the engine's weights with `state` (a state dict) or the folder `path`.

        A bad update (names, shapes, a missing folder) is refused before anything loads:
        the engine keeps its version. A failure *during* the load leaves a mix of two
        versions, so the actor labels itself broken (version None) and refuses to sample
        until the pool replaces it; it never serves mixed weights under either label."""
        try:  # a lost bucket or a dead owner fails here, the engine untouched
            items = checked_update(self.expected, self.tied, state, path, skip=self.skip)
        except ray.exceptions.RayError as e:
            raise SamplerError(f"sampler {self.index}: the weights of version {version} cannot be read from the "
                               f"object store ({type(e).__name__}: the trainer that put them died?); the engine "
                               f"keeps version {self.version}") from None
        if isinstance(state, StoredWeights) and self.tensor_parallel_size > 1:  # GPU only, not run here: the
            items = list(items)  # executor pickles its arguments, and a generator does not pickle
        if self._fault_after is not None:
            items, self._fault_after = _failing_after(items, self._fault_after), None
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items})
        except Exception as e:
            self.version = None
            raise SamplerError(f"sampler {self.index}: loading version {version} failed part-way ({e}); "
                               f"the engine holds mixed weights and will be replaced") from None
        self.version = version
        return version

    # sampler.weight_transport=nccl (GPU only; NEVER RUN here, no GPU): vLLM's trainer-side
    # NCCLTrainerWeightTransferEngine drives these through vLLM's RayVLLMWeightSyncClient,
    # which calls them by these names with these request types; the worker-side halves are
    # vLLM's own (gpu_worker.init_weight_transfer_engine, ...). Between start and
    # `set_version` the engine is labelled broken (version None): an update that fails
    # part-way leaves mixed weights, and the pool replaces the engine.

    def init_weight_transfer_engine(self, request) -> None:
        # vLLM ranks a worker by its data-parallel index, and every raydpo engine is a
        # standalone LLM (index 0): the trainer's one rank_offset would give every engine's
        # worker 0 the same rank. Engines are handed over in slot order: offset each by slot.
        info = {**request.init_info, "rank_offset": 1 + self.index * self.tensor_parallel_size}
        self.llm.collective_rpc("init_weight_transfer_engine", args=(info,))

    def shutdown_weight_transfer_engine(self) -> None:
        self.llm.collective_rpc("shutdown_weight_transfer_engine")

    def start_weight_update(self) -> None:
        self.version, self._received = None, False
        self.llm.collective_rpc("start_weight_update")

    def update_weights(self, request) -> None:
        self.llm.collective_rpc("update_weights", args=(request.update_info,))

    def finish_weight_update(self) -> None:
        self.llm.collective_rpc("finish_weight_update")
        self._received = True

    def heads_skipped(self) -> set[str]:
        """Tied heads this engine's model has no module for (`engine_heads_missing`): never sent."""
        return set(self.skip)

    def set_version(self, version: int) -> int:
        """Label the weights an NCCL update just brought: only after a finished update."""
        if not self._received:
            raise SamplerError(f"sampler {self.index}: no finished NCCL weight update to label version {version}")
        self._received, self.version = False, version
        return version

    def inject_reload_fault(self, after_tensors: int) -> None:
        """Tests: make the next load fail after `after_tensors` tensors have gone in."""
        self._fault_after = after_tensors

    def generate(self, prompts: Sequence[str], first_index: int, s: SamplingSettings, min_version: int,
                 seeds: Sequence[int] | None = None) -> list[Sample] | Stale:
        """Samples for `prompts`, or `Stale` (this actor's version) if it is older than `min_version`.

        Token in, token out: the prompts are encoded here with `encode_prompts` (the trainer's
        rule) and handed to vLLM as ids, and every sample carries those ids, its generated ids,
        their log-probs and the finish reason (`s.logprobs` and `s.text` may leave out the
        log-probs or the text where the caller does not use them: vLLM then skips that work).
        Sample j of prompt i is its own request, seeded with derive_seed(seeds[i], j) (default
        seeds: derive_seed(s.seed, first_index + i)), so what a sample draws does not depend on
        the batch or the engine it ran in.
        """
        if self.version is None:
            raise SamplerError(f"sampler {self.index}: a weight load failed part-way; this engine must be replaced")
        if self.version < min_version:
            return Stale(self.version)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from raydpo.data.tokenize import encode_prompts

        if seeds is None and s.seed is not None:
            seeds = [derive_seed(s.seed, first_index + i) for i in range(len(prompts))]
        prompt_ids = encode_prompts(self.tokenizer, prompts, self.prefix)
        requests, params = [], []
        for i, ids in enumerate(prompt_ids):
            for j in range(s.n):
                requests.append(TokensPrompt(prompt_token_ids=ids))
                params.append(SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p,
                                             max_tokens=s.max_new_tokens, stop=list(s.stop) or None,
                                             logprobs=0 if s.logprobs else None,
                                             detokenize=s.text or bool(s.stop),  # stop strings match text
                                             seed=None if seeds is None else derive_seed(seeds[i], j)))
        outs = self.llm.generate(requests, params, use_tqdm=False)
        samples = []
        for r, out in enumerate(outs):
            i, j = divmod(r, s.n)
            c = out.outputs[0]
            lps = tuple(step[t].logprob for step, t in zip(c.logprobs or [], c.token_ids))
            samples.append(Sample(first_index + i, j, prompts[i], c.text if s.text else "", tuple(c.token_ids), lps,
                                  c.finish_reason or "length", self.version, tuple(prompt_ids[i])))
        return samples

