"""Online DPO with bounded staleness (loop.max_staleness = k >= 1): sampling and judging run
ahead of training, and evaluation runs beside it. `loop.run` picks this for k >= 1; k = 0 is
the synchronous loop of `raydpo.online.loop`, unchanged.

Five threads in the driver, each waiting on its own roles:

  producer    iteration i's pairs: prompts -> samples -> judge -> pairs -> store, chunk by
              chunk (`collect_pairs`). It starts iteration i once version i-1-k is on every
              sampler and asks for nothing older (min_version), so every pair of iteration i
              comes from a version in [i-1-k, i-1]: at most k behind the policy that trains on
              it. A slow trainer therefore holds the producer back; it never makes pairs stale.
  trainer     (the caller's thread) waits for iteration i's pairs, keeps those at most k
              versions behind (`within_staleness`: a stored pair staler than that, e.g. after
              a resume with a smaller k, is counted as stale_dropped), trains, and hands
              version i to the publisher; then goes on to iteration i+1.
  publisher   publishes version i to the samplers and the policy endpoint, then hands it to
              the evaluator. A publish waits while the samplers hold version i-1 for its
              evaluation; the trainer does not (it waited there before: 0.5 s an iteration
              measured, when evaluation drew more samples than training).
  evaluator   draws version i's eval samples while i+1 trains, with version i held on the
              samplers only while they are drawn (`SamplerPool.hold`), and hands them on;
  scorer      judges them and estimates KL, log pi from the sampler and only the frozen
              reference from the trainer, while the next version's samples are drawn (at most
              one version behind the evaluator). Rows land in online_metrics.jsonl in
              iteration order, each with its version's evaluation.

The producer's gate (the version on every sampler) still bounds everything: with a slow
evaluation, publishes fall behind, then the producer, then the trainer waits for pairs.

Weights change between sampler calls only (an actor runs one call at a time), so every
sample carries the version that produced it and no response mixes versions. Evaluation
and pair sampling share the sampler engines, first come first served.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, wait
from pathlib import Path

from raydpo.config import RunConfig
from raydpo.errors import RaydpoError
from raydpo.online.collect import collect_pairs
from raydpo.online.evaluate import draw_eval, score_eval
from raydpo.online.loop import Timer, publish, train  # loop imports this module only inside run()
from raydpo.online.pairs import counts_row
from raydpo.online.resume import ResumePoint, publish_trained, trained_row
from raydpo.report import TIME_KEYS, append_metrics

POLL_S = 0.02


class Stopped(RaydpoError):
    """A thread of the overlapped loop was told to stop (another one failed)."""


class Producer:
    """Iterations first..last's pairs into the store, each as early as the staleness bound allows."""

    def __init__(self, cfg: RunConfig, r, first: int, last: int):
        self.cfg, self.r, self.k = cfg, r, cfg.loop.max_staleness
        self.results = {it: Future() for it in range(first, last + 1)}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raydpo-producer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for it, fut in self.results.items():
            try:
                oldest = max(0, it - 1 - self.k)
                self._wait_for_version(oldest)
                timer = Timer()
                counts = collect_pairs(self.cfg, it, self.r.prompts, self.r.pool, self.r.judge, self.r.store, timer,
                                       version=it - 1, oldest=oldest, check=self._check)
                fut.set_result((counts, timer.spent))
            except BaseException as e:  # handed to the trainer thread, which raises it
                for later in self.results.values():
                    if not later.done():
                        later.set_exception(e)
                return

    def _check(self) -> None:
        if self._stop.is_set():
            raise Stopped("producer stopped")

    def _wait_for_version(self, version: int) -> None:
        while self.r.pool.version < version:
            self._check()
            time.sleep(POLL_S)

    def pairs(self, it: int, timeout_s: float | None) -> tuple[object, dict]:
        """(PairCounts, seconds per phase) of iteration `it`, once all its chunks are stored."""
        return self.results[it].result(timeout_s)

    def ready(self, it: int, timeout_s: float) -> bool:
        """Whether iteration `it`'s pairs are stored (or its producing failed), waiting up to
        `timeout_s`. Not `pairs` with a timeout: a failure that is itself a TimeoutError
        (a Ray call's) would read as "not yet"."""
        return bool(wait([self.results[it]], timeout_s).done)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


class _InOrder:
    """A driver thread doing the jobs handed in, in order. Its first failure is kept and raised
    in the trainer thread by `check`; after it (or `abort`) later jobs are only let go of."""

    def __init__(self, name: str):
        self.name = name
        self._todo: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self._lock = threading.Lock()  # a job queued under it is always before stop()'s end marker
        self._thread = threading.Thread(target=self._run, name=f"raydpo-{name}", daemon=True)
        self._thread.start()

    def _do(self, job) -> None:
        raise NotImplementedError

    def _drop(self, job) -> None:
        """Let go of what a job not done holds."""

    def _run(self) -> None:
        while True:
            job = self._todo.get()
            try:
                if job is None:
                    return
                if self.error is not None:  # after a failure
                    self._drop(job)
                    continue
                try:
                    self._do(job)
                except BaseException as e:  # raised in the trainer thread by check()
                    self.error = e
            finally:
                self._todo.task_done()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def drain(self) -> None:
        """Wait for every job handed in; raise the first failure."""
        self._todo.join()
        self.check()

    def abort(self) -> None:
        """Do nothing more: what is queued is only let go of; `stop` then ends the thread."""
        with self._lock:
            if self.error is None:
                self.error = Stopped(f"{self.name} stopped")

    def stop(self, abort: bool = False) -> None:
        """Finish the jobs handed in (or with `abort`, only let go of them), then end the thread."""
        if abort:
            self.abort()
        with self._lock:
            self._todo.put(None)
        self._thread.join(120)


class Evaluator(_InOrder):
    """Draws each version's evaluation samples, in the order the versions are handed in, with
    the version held on the samplers only while they are drawn; hands them to its `Scorer`.

    Two stages, so a version's draws do not wait for the previous version's judging and KL:
    with one in-order evaluator, the next publish waited on every version's whole evaluation
    (its hold lasted until the evaluator got to it), and that, not training or sampling, set
    the loop's pace (measured: sync_held 0.8 s an iteration, bench/async_vs_sync.py).
    The scorer may lag by one version, no more: a version's draws (its hold with them) wait
    while the scorer has another version queued, so a slow judge slows the publishes, and
    with them the whole loop, instead of piling up unscored versions."""

    def __init__(self, cfg: RunConfig, r, run_dir: Path, log_row):
        self.cfg, self.r = cfg, r
        self.scorer = Scorer(cfg, r, run_dir, log_row)
        super().__init__("evaluator")

    def submit(self, it: int, row: dict) -> None:
        """Evaluate version `it` (the samplers' current one) and complete `row` with it."""
        with self._lock:  # a version held here is always queued before stop()'s end marker
            self.check()
            held = self.r.pool.hold()
            if held != it:
                self.r.pool.release(held)
                raise RuntimeError(f"evaluating version {it}, but the samplers are at {held}")
            self._todo.put((it, row, time.perf_counter()))

    def _drop(self, job) -> None:
        self.r.pool.release(job[0])  # the version held for it

    def _do(self, job) -> None:
        it, row, queued = job
        try:
            self._wait_for_scorer()
            t = time.perf_counter()
            samples, hot = draw_eval(self.cfg, it, self.r.pool, self.r.eval_prompts)
        finally:
            self.r.pool.release(it)
        row["time_eval"], row["time_eval_queued"] = time.perf_counter() - t, t - queued
        self.scorer.submit(it, row, samples, hot)

    def _wait_for_scorer(self) -> None:
        """Until the scorer has at most the previous version in hand; its failure, or this
        stage's abort, raised instead (nothing more is drawn for rows that cannot land)."""
        while True:
            self.scorer.check()
            if self.error is not None:
                raise Stopped(f"{self.name} stopped")
            if self.scorer.backlog() <= 1:
                return
            time.sleep(POLL_S)

    def check(self) -> None:
        super().check()
        self.scorer.check()

    def drain(self) -> None:
        super().drain()
        self.scorer.drain()

    def abort(self) -> None:
        super().abort()
        self.scorer.abort()

    def stop(self, abort: bool = False) -> None:
        super().stop(abort)
        self.scorer.stop(abort)


class Scorer(_InOrder):
    """Judges each version's evaluation samples and takes the reference's log-probs for its KL
    from the trainer, in version order; appends each finished row and logs it."""

    def __init__(self, cfg: RunConfig, r, run_dir: Path, log_row):
        self.cfg, self.r, self.run_dir, self.log_row = cfg, r, run_dir, log_row
        super().__init__("scorer")

    def submit(self, it: int, row: dict, samples: list, hot: list) -> None:
        with self._lock:
            self.check()  # stopped or failed: the evaluator hears it, not a row dropped unseen
            self._todo.put((it, row, samples, hot, time.perf_counter()))

    def backlog(self) -> int:
        """Versions handed in and not yet scored (the one being scored included)."""
        return self._todo.unfinished_tasks

    def _do(self, job) -> None:
        it, row, samples, hot, queued = job
        r, t = self.r, time.perf_counter()
        row.update(score_eval(self.cfg, it, r.judge, r.trainer, r.eval_prompts, r.baseline, samples, hot,
                              sampler_logps=True))
        # the evaluation's own time, drawing and scoring; what it waited for, before each
        row["time_eval"] += time.perf_counter() - t
        row["time_eval_queued"] += t - queued
        append_metrics(self.run_dir, row)
        self.log_row(row)


class Publisher(_InOrder):
    """Versions to the samplers and the policy endpoint, then to the evaluator, in the order
    they are handed in, beside the trainer."""

    def __init__(self, r, evaluator: Evaluator):
        self.r, self.evaluator = r, evaluator
        super().__init__("publisher")

    def submit(self, it: int, row: dict, publish_it=None) -> None:
        """Run `publish_it()` (None: version `it` is on the samplers already), then evaluate `it`."""
        self.check()
        self._todo.put((it, row, publish_it))

    def _do(self, job) -> None:
        it, row, publish_it = job
        if publish_it is not None:
            held, t = self.r.pool.stats.held_s, time.perf_counter()
            publish_it()
            row["time_sync"] = time.perf_counter() - t
            row["time_sync_held"] = self.r.pool.stats.held_s - held  # waited for version it-1's eval samples
        self.evaluator.submit(it, row)


def _pairs(producer: Producer, it: int, publisher: Publisher, evaluator: Evaluator) -> tuple[object, dict]:
    """Iteration `it`'s pairs, or the publisher's or evaluator's failure: the producer waits for
    versions only the publisher brings. No timeout of its own: sampler and judge calls time out
    themselves (sampler.request_timeout_s, judge.call_timeout_s)."""
    while not producer.ready(it, POLL_S * 25):
        publisher.check()
        evaluator.check()
    return producer.pairs(it, 0)


def run_iterations(cfg: RunConfig, r, point: ResumePoint, run_dir: Path, log_row) -> None:
    """Iterations point.first..N with sampling ahead, and publishing and evaluation beside training."""
    last = cfg.loop.iterations
    producer = Producer(cfg, r, max(point.first, point.trained_upto + 1, 1), last)
    evaluator = Evaluator(cfg, r, run_dir, log_row)
    publisher = Publisher(r, evaluator)
    t_prev = time.perf_counter()
    try:
        for it in range(point.first, last + 1):
            publisher.check()
            evaluator.check()
            row: dict = {"iteration": it, "policy_version": it, **{f"time_{k}": 0.0 for k in TIME_KEYS}}
            job = None
            if it == 0:
                row.update(pairs=0, **r.first_row)
            elif it <= point.trained_upto:  # trained before the driver died, not evaluated
                job = lambda it=it: publish_trained(it, run_dir, r.pool, r.policy)  # noqa: E731
                row.update(trained_row(cfg, r.store, run_dir, it))
            else:
                timer = Timer()
                with timer("wait"):
                    counts, spent = _pairs(producer, it, publisher, evaluator)
                row.update(counts_row(counts))
                columns, result = train(cfg, it, r, timer)
                row.update(columns)
                job = lambda it=it, result=result: publish(cfg, it, r, result, run_dir)  # noqa: E731
                for phase in ("sample", "judge", "store"):  # the producer's, overlapping the trainer's
                    row[f"time_{phase}"] = spent[phase]
                row.update({f"time_{k}": timer.spent[k] for k in ("wait", "train")})
            now = time.perf_counter()
            # the iteration's wall time on the trainer's path: from the end of the previous training to this one's
            row["time_total"], t_prev = now - t_prev, now
            row["time_other"] = max(0.0, row["time_total"] - row["time_wait"] - row["time_train"])
            publisher.submit(it, row, job)
        publisher.drain()
        evaluator.drain()
    except BaseException:
        producer.stop()  # between chunks: nothing half-judged is stored
        publisher.abort()  # first: it publishes nothing more while the evaluator stops
        evaluator.stop(abort=True)  # lets go of held versions, so a publish waiting on one ends
        publisher.stop()
        raise
    producer.stop()
    publisher.stop()
    evaluator.stop()
