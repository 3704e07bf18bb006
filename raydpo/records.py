"""The typed contracts between roles (no Ray, no torch).

* sampler -> loop:      `SamplingSettings` in, `Sample` out (ids, log-probs, finish reason, version);
* judge   -> loop/HTTP: `Judgement` per compared pair, `JudgeInfo` for the judge's identity and nature;
* loop    -> trainer:   `TrainRequest`, `KLRequest`, `StopRequest` in; `TrainResult`, `KLResult` out.

Errors do not travel in these records: a role raises an exception from `raydpo.errors`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal


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
    # what a sample carries beyond its ids: the sampled tokens' log-probs (training and the KL
    # estimate need them, a win-rate evaluation does not) and its text (judges need it, the KL
    # estimate does not; text is still decoded when `stop` strings must be matched). Off, the
    # Sample has () or "" there; the ids drawn are the same.
    logprobs: bool = True
    text: bool = True

    @classmethod
    def from_config(cls, sampler) -> SamplingSettings:
        """From a `raydpo.config.SamplerConfig` (duck-typed: records import nothing)."""
        return cls(n=sampler.samples_per_prompt, temperature=sampler.temperature, top_p=sampler.top_p,
                   max_new_tokens=sampler.max_new_tokens, stop=tuple(sampler.stop), seed=sampler.seed)


@dataclass(frozen=True)
class Stale:
    """A sampler's answer instead of samples when its weights are older than the request's
    `min_version`: it sampled nothing; `version` is what it holds."""

    version: int


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


# ------------------------------------------------------------------ judge

Preferred = Literal["a", "b", "tie", "invalid"]


@dataclass(frozen=True)
class Judgement:
    """A judge's verdict on (prompt, response_a, response_b)."""

    preferred: Preferred
    margin: float  # score_a - score_b for scoring judges; +1 / -1 / 0 for pairwise judges
    score_a: float | None = None
    score_b: float | None = None
    answers: tuple[str, ...] = ()  # pairwise judges: what the judge model wrote, in (a, b) then (b, a) order
    parsed: tuple[str, ...] = ()  # ... and what each answer was read as
    # remote judges (judge.kind=openai): what the verdict cost
    calls: int = 0  # orders answered by a request (retries not counted)
    cached: int = 0  # orders answered from the verdict cache
    retries: int = 0
    prompt_tokens: int = 0  # as the endpoint's `usage` counted them; cached orders count 0
    completion_tokens: int = 0
    cost: float = 0.0  # by judge.remote.price_*_per_1k


@dataclass(frozen=True)
class JudgeInfo:
    """Who a judge is, and whether it scores one response or compares two (`pairwise`).
    The loop ranks a prompt's k samples by score, or by round-robin comparisons when pairwise."""

    name: str  # e.g. "rule:raydpo.tasks.style:score", goes into every stored pair
    kind: str  # a key of raydpo.judge.kinds.KINDS
    pairwise: bool
    tie_margin: float = 0.0
    costed: bool = False  # a scoring judge that also answers score_items_costed: (score, what it cost) per item


# ------------------------------------------------------------------ trainer


@dataclass(frozen=True)
class TrainRequest:
    """Train one online iteration: `passes` passes over `dataset` (a Ray Dataset of
    tokenized pairs), after replacing the reference with the current policy if asked."""

    op: ClassVar[str] = "train"
    iteration: int
    dataset: Any
    passes: int
    refresh_reference: bool = False
    engines: tuple = ()  # sampler.weight_transport=nccl: the engines to broadcast the new weights into
    # what the driver kept of the stored pairs and why (staleness histogram, drops): saved with
    # the reply, so a resumed run reports what this training saw, under the bound it had then
    kept: dict = field(default_factory=dict)


@dataclass(frozen=True)
class KLRequest:
    """Mean log pi(y|x) - log pi_ref(y|x) over the given (prompt ids, response ids).

    `policy_logps`: log pi(y|x) per response as the sampler computed it while sampling
    (the sum of its token log-probs). Given, the trainer scores only the frozen reference,
    so the answer does not depend on which version the trainer holds by then (the loop
    with loop.max_staleness > 0 evaluates a version while the next one trains)."""

    op: ClassVar[str] = "kl"
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    iteration: int = -1
    policy_logps: list[float] | None = None


@dataclass(frozen=True)
class StopRequest:
    op: ClassVar[str] = "stop"
    iteration: int = -1


@dataclass(frozen=True)
class Answered:
    """What the mailbox keeps of a command once its reply reached the driver: its kind and
    iteration, without the payload (a dataset), so a restarted worker can count past it."""

    op: str
    iteration: int


@dataclass
class TrainResult:
    """The trainer's answer to a `TrainRequest`; saved (without `weights`) in the iteration's checkpoint."""

    steps: int  # optimizer steps over all passes
    pairs: int  # training rows of the iteration
    metrics: dict[str, float]  # means over the last pass's steps
    step: int  # optimizer steps since the run began
    seconds: float = 0.0
    weights: Any = None  # [raydpo.weights.StoredWeights] of the new policy (rank 0's), None when not sent
    timing: dict[str, float] = field(default_factory=dict)
    from_checkpoint: bool = False  # answered from the checkpoint after a worker restart
    kept: dict = field(default_factory=dict)  # the command's `kept`, handed back

    def saved(self) -> dict:
        """What goes into the checkpoint's trainer_state.json."""
        return {"steps": self.steps, "pairs": self.pairs, "metrics": self.metrics, "step": self.step,
                "kept": self.kept}


@dataclass(frozen=True)
class KLResult:
    kl: float
    n: int
    seconds: float = 0.0
