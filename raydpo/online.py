"""Driver-side parts of the online-DPO loop. `jobs/online_dpo.py` is the loop
itself, top-down; this module holds what it calls:

* `build_pairs`: judged samples -> preference pairs (pure, no Ray);
* `PromptSource`: prompts from JSONL/Parquet, shuffled under the seed, a fresh window per iteration;
* `JudgeClient`: the judge's Serve deployment handle (score / compare, both orders);
* `OnlineTrainer`: the long-lived Ray Train run (`raydpo.train.online_worker`);
* `win_rate`: pairwise evaluation against fixed samples of the starting policy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from raydpo.data.store import StoredPair
from raydpo.judge import TIE_EPS, combine_both_orders
from raydpo.records import Sample

# ------------------------------------------------------------------ pairs


@dataclass
class PairCounts:
    prompts: int = 0
    samples: int = 0
    pairs: int = 0
    ties: int = 0  # prompts (best_worst) or candidate pairs (all) dropped: score gap within the tie margin
    identical: int = 0  # dropped: chosen and rejected texts are the same
    below_margin: int = 0  # pairs='all': gap above the tie margin but not above pair_margin
    invalid: int = 0  # pairwise judges: comparisons answered unparseably (left out of the ranking)
    unranked: int = 0  # samples left out of pairing: every comparison of theirs was unparseable

    def add(self, other: PairCounts) -> None:
        for k, v in other.__dict__.items():
            setattr(self, k, getattr(self, k) + v)


def build_pairs(groups: Sequence[Sequence[Sample]], scores: Sequence[Sequence[float]], *, iteration: int,
                first_prompt: int, judge: str, mode: str = "best_worst", tie_margin: float = 0.0,
                pair_margin: float = 0.0) -> tuple[list[StoredPair], PairCounts]:
    """Preference pairs from the k judged samples of each prompt.

    ``best_worst``: the highest- vs the lowest-scored sample, if their gap is
    above `tie_margin` and their texts differ. ``all``: every pair of distinct
    texts whose gap is above max(tie_margin, pair_margin). Pair ids are
    deterministic (iteration, prompt position, sample indices), so re-running
    the same chunk gives the same ids.
    """
    out, c = [], PairCounts()
    for g, (samples, sc) in enumerate(zip(groups, scores)):
        c.prompts += 1
        c.samples += len(samples)
        versions = {s.policy_version for s in samples}
        if len(versions) != 1:
            raise ValueError(f"prompt {first_prompt + g}: samples from several policy versions {sorted(versions)}")
        version = versions.pop()
        ranked = [i for i in range(len(samples)) if not math.isnan(sc[i])]  # NaN: the judge could not rank it
        c.unranked += len(samples) - len(ranked)
        order = sorted(ranked, key=lambda i: (sc[i], -i))  # worst .. best; ties: lower index wins
        if mode == "best_worst":
            candidates = [(order[-1], order[0])] if len(order) > 1 else []
        else:
            candidates = [(i, j) for i in ranked for j in ranked if sc[i] > sc[j]]
        for ci, ri in candidates:
            gap = sc[ci] - sc[ri]
            if gap <= tie_margin + TIE_EPS:
                c.ties += 1
            elif samples[ci].text == samples[ri].text:
                c.identical += 1
            elif mode == "all" and gap <= pair_margin + TIE_EPS:
                c.below_margin += 1
            else:
                out.append(StoredPair(
                    pair_id=f"it{iteration:06d}-p{first_prompt + g:06d}-s{ci}-{ri}", iteration=iteration,
                    policy_version=version, source="online", prompt=samples[ci].prompt, chosen=samples[ci].text,
                    rejected=samples[ri].text, chosen_score=float(sc[ci]), rejected_score=float(sc[ri]), judge=judge,
                    prompt_token_ids=samples[ci].prompt_token_ids, chosen_token_ids=samples[ci].token_ids,
                    rejected_token_ids=samples[ri].token_ids, chosen_finish_reason=samples[ci].finish_reason,
                    rejected_finish_reason=samples[ri].finish_reason, chosen_logprobs=samples[ci].logprobs,
                    rejected_logprobs=samples[ri].logprobs))
    c.pairs = len(out)
    return out, c


# ------------------------------------------------------------------ prompts


class PromptSource:
    """Prompts (a 'prompt' column, JSONL or Parquet) read and checked, shuffled once under
    the seed; iteration i takes the next window of n prompts, wrapping around (a new epoch
    over the prompts) when they run out.

    The order is numpy's permutation under the seed, computed on the driver. It used to be
    Ray Data's `random_shuffle(seed)`, which is slower (a few hundred prompts took 9-30 s on
    2 cores: one map and one reduce task per block, 200 blocks) and whose order depends on
    how the data is cut into blocks, which Ray picks from the data source and the cluster's
    CPUs: the same seed gave other windows on another cluster size."""

    def __init__(self, path: str | Path, seed: int):
        import numpy as np

        from raydpo.data.formats import DataError, read_prompts

        self.path = str(path)
        prompts, self.report = read_prompts(self.path)  # bad records named by file and line, and counted
        self.bad = sum(self.report.bad.values())
        if not prompts:
            first = f"; first: {self.report.examples[0]}" if self.report.examples else ""
            raise DataError(f"{path}: no usable prompts ({self.bad} bad records{first})")
        order = np.random.default_rng(seed).permutation(len(prompts))
        self._all = [prompts[i] for i in order]
        self.size = len(prompts)

    def window(self, iteration: int, n: int) -> list[str]:
        start = ((iteration - 1) * n) % self.size
        return [self._all[(start + j) % self.size] for j in range(n)]  # wraps: both ends

    def all(self) -> list[str]:
        return list(self._all)


def write_prompts(path: Path, prompts: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    return path


# ------------------------------------------------------------------ judge


def copeland_scores(k: int, verdicts: dict[tuple[int, int], str]) -> list[float]:
    """Scores of k samples from pairwise verdicts on (i, j), i < j ("a": i better,
    "b": j better, "tie", "invalid"): the share of a sample's *valid* comparisons it won,
    ties counting half (Copeland, normalised). An unparseable verdict is left out for both
    samples, rather than counting as a loss for both; a sample with no valid comparison
    scores NaN and `build_pairs` leaves it out. Lets best-vs-worst pairing run on a judge
    that only compares."""
    won, valid = [0.0] * k, [0] * k
    for (i, j), v in verdicts.items():
        if v not in ("a", "b", "tie"):
            continue
        valid[i] += 1
        valid[j] += 1
        won[i] += 1.0 if v == "a" else 0.5 if v == "tie" else 0.0
        won[j] += 1.0 if v == "b" else 0.5 if v == "tie" else 0.0
    return [w / n if n else float("nan") for w, n in zip(won, valid)]


class JudgeClient:
    """The judge app through its Serve deployment handle (no HTTP on the loop's path).
    Scoring judges (rule, reward model) score; pairwise judges (llm) compare, in both
    orders inside the app, and rank a prompt's k samples by round-robin comparisons."""

    def __init__(self, handle):
        self.handle = handle
        self.info = handle.info.remote().result()
        self.name = self.info["judge"]
        self.pairwise = self.info["kind"] == "llm"
        self.invalid = 0  # comparisons the judge answered unparseably, over this client's life

    def rank(self, groups: Sequence[Sequence[tuple[str, str]]]) -> list[list[float]]:
        """A score per (prompt, response) in each group: the judge's scores, or Copeland
        scores from comparing every pair of the group (pairwise judges)."""
        if not self.pairwise:
            flat = self.score([x for g in groups for x in g])
            out, i = [], 0
            for g in groups:
                out.append(flat[i:i + len(g)])
                i += len(g)
            return out
        keys, items = [], []
        for gi, g in enumerate(groups):
            for i in range(len(g)):
                for j in range(i + 1, len(g)):
                    keys.append((gi, i, j))
                    items.append((g[i][0], g[i][1], g[j][1]))
        verdicts = self._compare(items)
        self.invalid += sum(v == "invalid" for v in verdicts)
        per_group: list[dict] = [{} for _ in groups]
        for (gi, i, j), v in zip(keys, verdicts):
            per_group[gi][(i, j)] = v
        return [copeland_scores(len(g), per_group[gi]) for gi, g in enumerate(groups)]

    def _compare(self, items: list[tuple[str, str, str]], chunk: int = 256) -> list[str]:
        rs = [self.handle.compare_items.remote(list(items[s:s + chunk])) for s in range(0, len(items), chunk)]
        return [x["preferred"] for r in rs for x in r.result()]

    def score(self, items: Sequence[tuple[str, str]], chunk: int = 256) -> list[float]:
        # several concurrent calls: @serve.batch and several replicas get to work in parallel
        responses = [self.handle.score_items.remote(list(items[s:s + chunk])) for s in range(0, len(items), chunk)]
        return [x for r in responses for x in r.result()]

    def compare_both_orders(self, items: Sequence[tuple[str, str, str]], chunk: int = 256) -> list[str]:
        """'a', 'b', 'tie' or 'invalid' for each (prompt, a, b), asked as (a, b) and as (b, a)."""
        if self.pairwise:  # the LLM judge app asks both orders itself
            return self._compare(list(items), chunk)
        first = self._compare(list(items), chunk)
        swapped = self._compare([(p, b, a) for p, a, b in items], chunk)
        return [combine_both_orders(f, s) for f, s in zip(first, swapped)]


@dataclass
class WinRate:
    win_rate: float
    wins: int
    ties: int
    losses: int
    invalid: int


def win_rate(judge: JudgeClient, prompts: Sequence[str], policy: Sequence[str],
             baseline: Sequence[Sequence[str]]) -> WinRate:
    """Each policy response against each fixed baseline response of its prompt,
    in both orders; ties count half; invalid verdicts are counted and left out."""
    items = [(p, r, b) for p, r, bs in zip(prompts, policy, baseline) for b in bs]
    verdicts = Counter(judge.compare_both_orders(items))
    valid = verdicts["a"] + verdicts["b"] + verdicts["tie"]
    rate = (verdicts["a"] + 0.5 * verdicts["tie"]) / valid if valid else float("nan")
    return WinRate(rate, verdicts["a"], verdicts["tie"], verdicts["b"], verdicts["invalid"])


# ------------------------------------------------------------------ trainer


def latest_iteration_checkpoint(storage: str | Path, name: str) -> tuple[Path, dict] | None:
    """(folder, trainer_state) of the online run's newest ``iter-NNNNNN`` checkpoint."""
    from raydpo.train.trainer import latest_checkpoint

    return latest_checkpoint(storage, name, pattern="iter-*", key="iteration")


@dataclass
class OnlineTrainer:
    """The trainer workers of the whole loop: one `TorchTrainer.fit()` running in a
    driver thread, fed through a `Mailbox` actor (see raydpo.train.online_worker)."""

    cfg: object
    start_path: str  # the starting policy (SFT output): weights and the fixed reference
    run_dir: str
    pad_id: int
    resume_from: str | None = None
    name: str = "online"
    fault: dict | None = None  # tests only: fault injection in the workers (raydpo.train.online_worker)
    _error: list = field(default_factory=list)

    def __post_init__(self):
        import ray
        from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
        from ray.train import RunConfig as TrainRunConfig
        from ray.train.torch import TorchTrainer

        from raydpo.train.online_worker import Mailbox, online_loop_per_worker
        from raydpo.train.trainer import make_spec

        cfg = self.cfg
        self.stall_timeout_s = cfg.trainer.stall_timeout_s
        spec = make_spec(cfg, "dpo", self.start_path, self.run_dir, metrics_prefix="online/", max_steps=0, epochs=1,
                         resume_from=self.resume_from)
        if cfg.loop.rpo_alpha is not None:  # the loop's own default (see LoopConfig.rpo_alpha)
            spec = dataclasses.replace(spec, loss=dataclasses.replace(spec.loss, rpo_alpha=cfg.loop.rpo_alpha))
        self.storage = Path(self.run_dir, "ray_train").resolve()
        self.mailbox = ray.remote(num_cpus=0)(Mailbox).remote()
        res = cfg.cluster.trainer
        self._trainer = TorchTrainer(
            online_loop_per_worker,
            train_loop_config={"spec": spec.to_dict(), "mailbox": self.mailbox, "pad_id": self.pad_id,
                               "cpus_per_worker": res.cpus, "fault": self.fault},
            scaling_config=ScalingConfig(num_workers=res.count, use_gpu=res.gpus > 0,
                                         resources_per_worker={"CPU": res.cpus, **({"GPU": res.gpus} if res.gpus else {})}),
            run_config=TrainRunConfig(name=self.name, storage_path=str(self.storage),
                                      failure_config=FailureConfig(max_failures=cfg.trainer.max_failures),
                                      checkpoint_config=CheckpointConfig(num_to_keep=None)),
        )
        self._thread = threading.Thread(target=self._fit, name="raydpo-online-trainer", daemon=True)
        self._thread.start()

    def _fit(self) -> None:
        try:
            self._trainer.fit()
        except BaseException as e:  # surfaced to the loop by _call
            self._error.append(e)

    def _call(self, command: dict, timeout_s: float) -> dict:
        import ray

        seq = ray.get(self.mailbox.post.remote(command))
        deadline = time.monotonic() + timeout_s
        while True:
            reply = ray.get(self.mailbox.result.remote(seq, 5.0))
            if reply is not None:
                ray.get(self.mailbox.done.remote(seq))  # the mailbox lets go of the dataset and weights
                return reply
            if not self._thread.is_alive():
                cause = self._error[0] if self._error else "it exited"
                raise RuntimeError(f"the online trainer stopped before answering {command['op']!r}: {cause}")
            silent = ray.get(self.mailbox.silent_s.remote())
            if silent > self.stall_timeout_s:
                raise TimeoutError(f"the online trainer's workers showed no sign of life for {silent:.0f}s while "
                                   f"{command['op']!r} (iteration {command.get('iteration')}) was pending "
                                   f"(trainer.stall_timeout_s={self.stall_timeout_s:g}); see the Ray Train logs "
                                   f"under {self.storage}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the online trainer did not answer {command['op']!r} within {timeout_s}s")

    def train(self, iteration: int, dataset, passes: int, refresh_reference: bool, timeout_s: float = 3600) -> dict:
        return self._call({"op": "train", "iteration": iteration, "dataset": dataset, "passes": passes,
                           "refresh_reference": refresh_reference}, timeout_s)

    def kl(self, prompt_ids: list[list[int]], response_ids: list[list[int]], timeout_s: float = 600) -> dict:
        return self._call({"op": "kl", "iteration": -1, "rows": {"prompt_ids": prompt_ids,
                                                                "response_ids": response_ids}}, timeout_s)

    def close(self, timeout_s: float = 120) -> None:
        import ray

        ray.get(self.mailbox.post.remote({"op": "stop", "iteration": -1}))
        self._thread.join(timeout_s)
        if self._error:
            raise RuntimeError(f"the online trainer failed: {self._error[0]}")
