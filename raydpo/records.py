"""Small typed records that cross process boundaries (no Ray, no torch)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, e.g. (run seed, iteration, prompt position, sample index).
    A hash, so seeds of neighbouring parts are unrelated and no two tuples collide in practice;
    a sample's seed then depends on what it is, not on which engine or batch it ran in."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class SamplingSettings:
    """What the sampler pool is asked to do for one request."""

    n: int = 4  # responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 24
    stop: tuple[str, ...] = ()
    seed: int | None = None  # per-request seed; each prompt gets seed + its index (unless `seeds` are given)

    @classmethod
    def from_config(cls, sampler) -> SamplingSettings:
        """From a `raydpo.config.SamplerConfig` (duck-typed: records import nothing)."""
        return cls(n=sampler.samples_per_prompt, temperature=sampler.temperature, top_p=sampler.top_p,
                   max_new_tokens=sampler.max_new_tokens, stop=tuple(sampler.stop), seed=sampler.seed)


@dataclass(frozen=True)
class Sample:
    """One response and the weights version that produced it. The ids are what the
    trainer trains on (what you sample is what you train); the text is for judges and people."""

    prompt_index: int  # position of the prompt in the request
    sample_index: int  # 0 .. n-1
    prompt: str
    text: str
    token_ids: tuple[int, ...]  # the generated ids, EOS included if and only if generation ended with it
    logprobs: tuple[float, ...]  # log-prob of each generated token under the sampler
    finish_reason: str  # "stop" (EOS or stop string) or "length" (cut at max_new_tokens)
    policy_version: int
    prompt_token_ids: tuple[int, ...] = ()  # the context the engine was given (BOS included if the tokenizer adds one)
