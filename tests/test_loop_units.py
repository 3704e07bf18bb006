"""The online loop's bookkeeping, without Ray: where a resumed run starts and what it
tidies, which weights it publishes before continuing, replay, the offline baseline's
pre-sampling, and a trained-but-unevaluated iteration's row. The stand-in pool and
judge below only record calls: the real ones run in test_online_e2e and test_sampler."""

import json

import pytest

from raydpo.config_io import load_config
from raydpo.data.store import PreferenceStore, StoredPair
from raydpo.online import offline_baseline
from raydpo.online.resume import ResumePoint, catch_up, iteration_checkpoint, resume_point, trained_row
from raydpo.online.training_data import pairs_version, training_table
from raydpo.records import JudgeInfo, Sample
from raydpo.report import METRICS_FILE
from raydpo.train.checkpoints import STATE_FILE, write_manifest


def complete_checkpoint(run_dir, it: int, reply: dict | None = None):
    ckpt = iteration_checkpoint(run_dir, it)
    ckpt.mkdir(parents=True)
    state = {"iteration": it, "step": 10 * it, "writers": [0], **({"reply": reply} if reply else {})}
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    write_manifest(ckpt, 0)
    return ckpt


def test_resume_point_after_a_kill_mid_iteration(tmp_path):
    """Iterations 0-1 evaluated, 2 trained (checkpoint) but not evaluated, 3 half trained;
    the metrics row being written when the driver died is cut off mid-line."""
    rows = [{"iteration": 0, "win_rate": 0.5}, {"iteration": 1, "win_rate": 0.6}]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 2, "wi')
    steps = [{"step": s, "online/iteration": it, "online/loss": 0.5} for s, it in ((1, 1), (2, 2), (3, 3), (4, 3))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps) + '{"step": 5, "onl')
    complete_checkpoint(tmp_path, 1)
    newest = complete_checkpoint(tmp_path, 2)
    broken = iteration_checkpoint(tmp_path, 3)  # a kill during the copy into storage: no manifest
    broken.mkdir()
    (broken / STATE_FILE).write_text(json.dumps({"iteration": 3, "writers": [0]}))

    point = resume_point(tmp_path, resume=True)
    assert point == ResumePoint(first=2, trained_upto=2, checkpoint=newest)
    # the cut-off row is gone, so the next append starts on a line of its own
    assert [json.loads(line)["iteration"] for line in (tmp_path / METRICS_FILE).read_text().splitlines()] == [0, 1]
    # the steps of iteration 3 will be trained (and logged) again: dropped, as is the cut-off line
    kept = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [1, 2]


def test_a_fresh_run_starts_at_zero_and_ignores_checkpoints(tmp_path):
    complete_checkpoint(tmp_path, 1)
    assert resume_point(tmp_path, resume=False) == ResumePoint(0, 0, None)


class RecordingPool:
    def __init__(self, version=0):
        self.version, self.published = version, []

    def publish(self, version, *, state_dict=None, path=None):
        self.published.append((version, path))
        self.version = version


@pytest.mark.parametrize("point, pool_calls, policy_calls", [
    # trained 2, evaluated through 1: evaluate 2 with its own weights first
    (lambda ck: ResumePoint(2, 2, ck(2)), [(2, 2)], [(2, 2)]),
    # trained and evaluated through 2: continue from 2's weights
    (lambda ck: ResumePoint(3, 2, ck(2)), [(2, 2)], [(2, 2)]),
    # evaluated 0 only, nothing trained: the samplers stay on the starting policy
    (lambda ck: ResumePoint(1, 0, None), [], []),
    # max_staleness > 0: 2 and 3 trained, neither evaluated: 2's weights now, 3's when the loop reaches it
    (lambda ck: ResumePoint(2, 3, ck(3)), [(2, 2)], [(2, 2)]),
])
def test_catch_up_publishes_the_weights_the_resumed_loop_needs(tmp_path, point, pool_calls, policy_calls):
    ck = lambda it: iteration_checkpoint(tmp_path, it)  # noqa: E731
    pool, policy = RecordingPool(), RecordingPool()
    catch_up(point(ck), tmp_path, pool, policy)
    assert pool.published == [(v, str(ck(i))) for v, i in pool_calls]
    assert policy.published == [(v, str(ck(i))) for v, i in policy_calls]


def stored(it, n, first=0):
    return [StoredPair(f"{it}-{i}", it, it - 1, "online", "p", "c", "r", 1.0, 0.0, "rule", (5, 6), (7, 8, 2),
                       (9, 10, 2), "stop", "stop", (-0.1, -0.2, -0.3), (-0.4, -0.5, -0.6))
            for i in range(first, first + n)]


def test_replay_adds_a_seeded_sample_of_earlier_iterations(tmp_path):
    store = PreferenceStore(tmp_path / "preferences")
    for it in (1, 2):
        store.write_chunk(it, 0, stored(it, 10))
    store.write_chunk(3, 0, stored(3, 4))
    cfg = load_config(None, [f"run_dir={tmp_path}", "loop.replay_fraction=1.5"])
    rows, stats = training_table(cfg, store, 3)
    assert stats["replayed_pairs"] == 6 and rows.num_rows == 10  # round(1.5 x 4 fresh) from the 20 earlier
    replayed = [r["prompt_ids"] for r in rows.slice(4).to_pylist()]
    assert len(replayed) == 6
    again, _ = training_table(cfg, store, 3)
    assert again.equals(rows)  # the same sample on a resumed run
    none, stats = training_table(load_config(None, [f"run_dir={tmp_path}"]), store, 3)
    assert none.num_rows == 4 and stats["replayed_pairs"] == 0


class StandInPool:
    """Samples that say which prompt and version they are, like SamplerPool.stream."""

    def __init__(self):
        self.version, self.requests = 0, 0

    def stream(self, prompts, settings, min_version, chunk_size, seeds):
        self.requests += 1
        for s in range(0, len(prompts), chunk_size):
            yield [Sample(s + i, j, p, f" {p}-{j}", (j + 1, 2), (-0.1, -0.2), "stop", self.version, (1,))
                   for i, p in enumerate(prompts[s:s + chunk_size]) for j in range(settings.n)]


class StandInJudge:
    info, name = JudgeInfo("rule:test", "rule", pairwise=False), "rule:test"

    def rank(self, groups, tally=None):
        return [[float(j) for j in range(len(g))] for g in groups]


class Prompts:
    def window(self, it, n):
        return [f"p{it}-{i}" for i in range(n)]


def test_the_offline_baseline_presamples_later_iterations_from_the_start_once(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}", "loop.pairs_from=start", "loop.iterations=4",
                             "loop.prompts_per_iteration=4", "loop.chunk_prompts=2", "sampler.samples_per_prompt=2"])
    store, pool = PreferenceStore(tmp_path / "preferences"), StandInPool()
    counts = offline_baseline.presample(cfg, Prompts(), pool, StandInJudge(), store, first=1)
    assert counts.pairs == 3 * 4 and pool.requests == 3  # iterations 2, 3, 4: a pair per prompt
    assert {p.iteration for p in store.read_pairs()} == {2, 3, 4}
    assert {p.policy_version for p in store.read_pairs()} == {0}
    again = offline_baseline.presample(cfg, Prompts(), pool, StandInJudge(), store, first=1)
    assert pool.requests == 3 and again.pairs == counts.pairs  # a resumed run samples nothing twice
    assert [pairs_version(cfg, it) for it in (1, 2, 3)] == [0, 0, 0]
    online = load_config(None, [f"run_dir={tmp_path}"])
    assert [pairs_version(online, it) for it in (1, 2, 3)] == [0, 1, 2]


def test_a_trained_row_without_a_saved_reply_still_counts_its_steps(tmp_path):
    """A checkpoint written before replies were saved with it: the row comes from the logged
    steps of the iteration's last pass. Before the fix it had no train_steps."""
    cfg = load_config(None, [f"run_dir={tmp_path}", "loop.dpo_passes=2"])
    store = PreferenceStore(tmp_path / "preferences")
    store.write_chunk(1, 0, stored(1, 4))
    complete_checkpoint(tmp_path, 1)
    steps = [{"step": s, "online/iteration": 1, "online/loss": loss, "online/rewards/accuracies": 0.5}
             for s, loss in ((1, 0.7), (2, 0.6), (3, 0.5), (4, 0.3))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    row = trained_row(cfg, store, tmp_path, 1)
    assert row["train_steps"] == 4 and row["dpo_loss"] == pytest.approx(0.4) and row["pairs"] == 4


def test_a_finished_sft_stage_is_reused_without_reading_its_data(tmp_path):
    """A resumed run (or a second job on the same run_dir) finds the finished SFT stage and
    skips the demonstrations' validation and tokenization (seconds of Ray Data for 20,000)."""
    from raydpo.train.staged import sft_stage

    cfg = load_config(None, [f"run_dir={tmp_path}", "trainer.sft_steps=30", "data.train_path=/nonexistent.jsonl"])
    ckpt = tmp_path / "ray_train" / "sft" / "sft-step-000030"
    ckpt.mkdir(parents=True)
    (ckpt / STATE_FILE).write_text(json.dumps({"step": 30, "final": True, "writers": [0]}))
    write_manifest(ckpt, 0)
    assert sft_stage(cfg, tmp_path / "base", tmp_path, pad_id=0) == ckpt  # the data file was never opened


def test_the_style_demonstrations_are_as_many_as_the_stage_trains_on(tmp_path):
    from raydpo.train.staged import STYLE_DEMONSTRATIONS, sft_demonstrations

    small = load_config(None, [f"run_dir={tmp_path / 'a'}", "trainer.sft_steps=30", "trainer.sft_batch_size=32"])
    assert len(open(sft_demonstrations(small, tmp_path / "a")).readlines()) == 960
    demo = load_config(None, [f"run_dir={tmp_path / 'b'}"])  # 1000 steps x 64: epochs over the capped set
    assert len(open(sft_demonstrations(demo, tmp_path / "b")).readlines()) == STYLE_DEMONSTRATIONS


def test_publish_trained_brings_the_samplers_to_a_trained_iteration_once(tmp_path):
    from raydpo.online.resume import publish_trained

    pool, policy = RecordingPool(version=2), RecordingPool(version=2)
    publish_trained(3, tmp_path, pool, policy)
    publish_trained(3, tmp_path, pool, policy)  # already there: nothing again
    ck = str(iteration_checkpoint(tmp_path, 3))
    assert pool.published == [(3, ck)] and policy.published == [(3, ck)]


def versioned(it, versions):
    return [StoredPair(f"{it}-{i}", it, v, "online", "p", "c", "r", 1.0, 0.0, "rule", (5, 6), (7, 8, 2),
                       (9, 10, 2), "stop", "stop", (-0.1, -0.2, -0.3), (-0.4, -0.5, -0.6))
            for i, v in enumerate(versions)]


@pytest.mark.parametrize("k, kept, hist", [(0, ["5-0", "5-3"], [2]), (1, ["5-0", "5-1", "5-3"], [2, 1]),
                                           (2, ["5-0", "5-1", "5-2", "5-3"], [2, 1, 1])])
def test_a_pair_staler_than_max_staleness_is_not_trained_on_and_is_counted(tmp_path, k, kept, hist):
    """Iteration 5 trains version 4 into 5: pairs of versions 4, 3, 2, 4 are 0, 1, 2, 0 behind."""
    store = PreferenceStore(tmp_path / "preferences")
    store.write_chunk(5, 0, versioned(5, [4, 3, 2, 4]))
    cfg = load_config(None, [f"run_dir={tmp_path}", f"loop.max_staleness={k}"])
    rows, stats = training_table(cfg, store, 5)
    assert rows.column("pair_id").to_pylist() == kept
    assert stats["stale_dropped"] == 4 - len(kept) and stats["staleness_hist"] == hist


@pytest.mark.parametrize("overrides, message", [
    (["loop.max_staleness=1", "loop.pairs_from=start"], "needs loop.pairs_from='current'"),
    (["loop.max_staleness=1", "loop.reference_policy=previous"], "needs loop.reference_policy='fixed'"),
    (["cluster.judge.cpu_ids=[0]"], "only cluster.trainer and cluster.sampler are pinned"),
    (["cluster.sampler.cpu_ids=[1,1]"], "must be distinct CPU ids"),
    (["loop.max_staleness=9"], "max_staleness"),
])
def test_overlapped_loop_settings_that_cannot_work_are_refused_by_name(overrides, message):
    from raydpo.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_pin_cpus_refuses_cpus_this_process_may_not_use():
    import os

    from raydpo.cluster import pin_cpus
    from raydpo.errors import ConfigError

    before = os.sched_getaffinity(0)
    with pytest.raises(ConfigError, match=r"cluster.sampler.cpu_ids=\[4096\]: .* may only run on CPUs"):
        pin_cpus([4096], "sampler")
    pin_cpus(None, "sampler")
    assert os.sched_getaffinity(0) == before


def test_pin_cpus_pins_every_thread_of_the_process():
    import subprocess
    import sys

    code = ("import os, threading, time\n"
            "from raydpo.cluster import pin_cpus\n"
            "t = threading.Thread(target=time.sleep, args=(3,)); t.start()  # a thread started before pinning\n"
            "cpu = min(os.sched_getaffinity(0))\n"
            "pin_cpus([cpu], 'trainer')\n"
            "tids = [int(x) for x in os.listdir('/proc/self/task')]\n"
            "assert len(tids) >= 2 and all(os.sched_getaffinity(tid) == {cpu} for tid in tids), tids\n"
            "print('pinned', len(tids))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("pinned"), r.stdout + r.stderr


def test_a_failed_publish_or_producer_reaches_the_trainer_waiting_for_pairs():
    """With max_staleness >= 1 a publisher thread brings each version to the samplers, and the
    producer samples only once the version it needs is there. If a publish fails, the trainer,
    waiting for pairs that will never come, must get the error, not wait forever; versions
    handed in after it are not published. A producer that failed with a TimeoutError (a Ray
    call's) must not read as "no pairs yet"."""
    import time
    from concurrent.futures import Future

    from raydpo.errors import SamplerError
    from raydpo.online.overlapped import Producer, Publisher, _pairs

    class Evaluator:
        submitted = []

        def submit(self, it, row):
            self.submitted.append(it)

        def check(self):
            pass

    class Waiting(Producer):  # iteration 2's pairs need version 1 on the samplers: they never come
        def __init__(self, result: Future):
            self.results = {2: result}

    pool = RecordingPool()
    pool.stats = type("Stats", (), {"held_s": 0.0})()
    evaluator = Evaluator()
    publisher = Publisher(type("Run", (), {"pool": pool})(), evaluator)

    def fail():
        raise SamplerError("sampler 0: loading version 1 failed part-way")

    publisher.submit(0, {})
    publisher.submit(1, {}, fail)
    publisher.submit(2, {}, lambda: pool.publish(2, path="x"))
    t = time.perf_counter()
    assert isinstance(_waited(lambda: _pairs(Waiting(Future()), 2, publisher, evaluator)), SamplerError)
    assert "version 1" in str(publisher.error) and time.perf_counter() - t < 5
    publisher.stop(abort=True)
    assert evaluator.submitted == [0] and pool.published == []  # nothing after the failure

    # the producer itself failed, with a TimeoutError (a Ray call's): raised, not read as "not yet"
    failed = Future()
    failed.set_exception(TimeoutError("ray.get timed out after 60s"))
    ok = Publisher(type("Run", (), {"pool": pool})(), evaluator)
    assert isinstance(_waited(lambda: _pairs(Waiting(failed), 2, ok, evaluator)), TimeoutError)
    ok.stop()


def _waited(fn, limit_s: float = 10):
    """What `fn` raised, run in a thread the test gives up on after `limit_s` (then it fails)."""
    import threading

    box: list = []
    waiting = threading.Thread(target=lambda: box.append(_catch(fn)), daemon=True)
    waiting.start()
    waiting.join(limit_s)
    assert not waiting.is_alive(), "the trainer still waits for pairs"
    return box[0]


def _catch(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e


class HoldingPool(RecordingPool):
    """A pool whose holds are recorded: `holds` lists the versions held now."""

    def __init__(self):
        super().__init__()
        self.holds = []

    def hold(self):
        self.holds.append(self.version)
        return self.version

    def release(self, version):
        self.holds.remove(version)


def _evaluating(monkeypatch, tmp_path, score):
    """An overlapped-loop Evaluator on a HoldingPool, with draw_eval recording what it drew and
    score_eval replaced by `score(it, samples)`; returns (evaluator, pool, drawn, logged rows)."""
    from raydpo.online import overlapped

    pool, drawn, logged = HoldingPool(), [], []

    def draw_eval(cfg, it, pool_, prompts):
        drawn.append(it)
        return [f"sample of {it}"], []

    monkeypatch.setattr(overlapped, "draw_eval", draw_eval)
    monkeypatch.setattr(overlapped, "score_eval", lambda cfg, it, judge, trainer, prompts, baseline, samples, hot,
                        sampler_logps: score(it, samples))
    run = type("Run", (), {"pool": pool, "judge": None, "trainer": None, "eval_prompts": [], "baseline": []})()
    return overlapped.Evaluator(None, run, tmp_path, logged.append), pool, drawn, logged


def _until(condition, what, limit_s: float = 10) -> None:
    import time

    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_the_next_versions_eval_samples_are_drawn_while_the_last_one_is_still_scored(tmp_path, monkeypatch):
    """The overlapped loop's evaluation: version i is held on the samplers only while its
    samples are drawn, so version i+1 can be published and drawn while i is still being
    judged (with one in-order stage, i+1's publish waited for all of i's evaluation and set
    the loop's pace). Rows still land in version order, each with its own scores."""
    import threading
    import time

    scoring = threading.Event()
    judged = {it: threading.Event() for it in range(3)}

    def score(it, samples):
        scoring.set()
        assert judged[it].wait(10), f"version {it} was never let through"
        return {"win_rate": 0.5 + it / 10, "scored": samples}

    evaluator, pool, drawn, logged = _evaluating(monkeypatch, tmp_path, score)
    try:
        evaluator.submit(0, {"iteration": 0})
        assert scoring.wait(10)  # version 0 drawn, and stuck in judging
        pool.publish(1)
        evaluator.submit(1, {"iteration": 1})  # held and drawn while 0 is still being judged
        _until(lambda: drawn == [0, 1] and not pool.holds, "version 1 drawn and let go")
        # the scorer lags one version, no more: 2 stays held, undrawn, until 0 is scored
        pool.publish(2)
        evaluator.submit(2, {"iteration": 2})
        time.sleep(0.3)
        assert drawn == [0, 1] and pool.holds == [2] and logged == []
        judged[0].set()
        _until(lambda: drawn == [0, 1, 2] and not pool.holds, "version 2 drawn once 0 was scored")
        judged[1].set()
        judged[2].set()
        evaluator.drain()
    finally:
        evaluator.stop()
    rows = [json.loads(line) for line in (tmp_path / "online_metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["win_rate"], r["scored"]) for r in rows] == [
        (0, 0.5, ["sample of 0"]), (1, 0.6, ["sample of 1"]), (2, 0.7, ["sample of 2"])]
    assert [r["iteration"] for r in logged] == [0, 1, 2] and all(r["time_eval"] >= 0 for r in rows)


def test_a_failed_scoring_reaches_the_trainer_and_nothing_more_is_drawn_or_held(monkeypatch, tmp_path):
    """The judge fails on version 0's evaluation: the trainer thread's check raises it, the
    versions handed in after it are neither drawn nor left held, and stopping does not hang."""
    import threading

    from raydpo.errors import JudgeError

    go = threading.Event()

    def score(it, samples):
        assert go.wait(10)
        raise JudgeError(f"judging version {it}: the judge endpoint refused the request")

    evaluator, pool, drawn, logged = _evaluating(monkeypatch, tmp_path, score)
    try:
        evaluator.submit(0, {"iteration": 0})
        _until(lambda: drawn == [0], "version 0 drawn")
        pool.publish(1)
        evaluator.submit(1, {"iteration": 1})  # drawn while 0 is judged
        _until(lambda: drawn == [0, 1], "version 1 drawn")
        pool.publish(2)
        evaluator.submit(2, {"iteration": 2})  # waits for the scorer, held
        go.set()
        _until(lambda: evaluator.scorer.error is not None, "the scorer failed")
        with pytest.raises(JudgeError, match="version 0"):
            evaluator.check()
        _until(lambda: not pool.holds, "version 2 let go")
        assert drawn == [0, 1] and logged == []
    finally:
        evaluator.stop(abort=True)
    assert not pool.holds and not (tmp_path / "online_metrics.jsonl").exists()
