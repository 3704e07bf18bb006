"""Small typed records that cross process boundaries (no Ray, no torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingSettings:
    """What the sampler pool is asked to do for one request."""

    n: int = 4  # responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 24
    stop: tuple[str, ...] = ()
    seed: int | None = None  # per-request seed; each prompt gets seed + its index

    @classmethod
    def from_config(cls, sampler) -> SamplingSettings:
        """From a `raydpo.config.SamplerConfig` (duck-typed: records import nothing)."""
        return cls(n=sampler.samples_per_prompt, temperature=sampler.temperature, top_p=sampler.top_p,
                   max_new_tokens=sampler.max_new_tokens, stop=tuple(sampler.stop), seed=sampler.seed)


@dataclass(frozen=True)
class Sample:
    """One response and the weights version that produced it."""

    prompt_index: int  # position of the prompt in the request
    sample_index: int  # 0 .. n-1
    prompt: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # log-prob of each generated token under the sampler
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    policy_version: int
