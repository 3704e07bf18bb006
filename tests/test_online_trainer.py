"""The online trainer's mailbox and restarts, on a real Ray Train run of the tiny model:

* a rank that dies after `ray.train.report` but before replying: the restarted workers
  answer the command from the checkpoint, with its weights, instead of leaving the
  driver waiting for a reply nobody sends;
* the mailbox lets go of every dataset and weights copy once the driver has the reply,
  so object-store use stays flat over iterations;
* no report waits for Ray Train's health check.
"""

import re

import numpy as np
import pytest

from raydpo.config_io import load_config
from raydpo.weights import read_safetensors, stored_items

pytestmark = pytest.mark.slow  # starts Ray, vLLM or Serve, or trains: `make test-fast` leaves it out

PASSES = 2
HEALTH_CHECK, HEALTH_CHECK_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 3


def _plasma_bytes() -> float:
    """Object-store use once frees in flight have landed (Ray frees asynchronously)."""
    import time

    import ray
    from ray._private.internal_api import memory_summary

    def now() -> float:
        # this session's Ray, named: with no address, Ray looks for *the* local Ray and
        # refuses when it finds several (another test session's, under pytest -n)
        address = ray.get_runtime_context().gcs_address
        m = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(address=address, stats_only=True))
        assert m, "Ray's memory summary changed format"
        return float(m.group(1)) * 2**20

    last = now()
    for _ in range(10):
        time.sleep(0.5)
        cur = now()
        if cur == last:
            break
        last = cur
    return last


def _rows(tokenizer, n: int, it: int) -> list[dict]:
    rng = np.random.default_rng(it)
    words = [" apple", " river", " stone", " please", " thanks"]
    out = []
    for i in range(n):
        p = tokenizer(f"about: {words[i % 5].strip()} | max {3 + i % 5}\n", add_special_tokens=False).input_ids
        c = tokenizer("".join(rng.choice(words, 4)) + ".", add_special_tokens=False).input_ids
        r = tokenizer("".join(rng.choice(words, 7)), add_special_tokens=False).input_ids
        out.append({"pair_id": f"{it}-{i}", "prompt_ids": p, "chosen_ids": c + [tokenizer.eos_token_id],
                    "rejected_ids": r})
    return out


@pytest.fixture(scope="module")
def trained(ray_local, tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """Six train commands; rank 0 dies after reporting iteration 2 (once). The driver asks Ray
    Train for a slow health check (HEALTH_CHECK_S), as a cluster may."""
    import os

    from raydpo.train.online_client import TrainerClient

    before = os.environ.get(HEALTH_CHECK)
    os.environ[HEALTH_CHECK] = str(HEALTH_CHECK_S)  # Ray Train hands it from the driver to its controller
    run_dir = tmp_path_factory.mktemp("online-trainer")
    cfg = load_config(None, ["trainer.batch_size=8", "trainer.micro_batch_size=8", "trainer.max_failures=1",
                             "cluster.trainer.cpus=1", "trainer.stall_timeout_s=300"])
    trainer = TrainerClient(cfg, str(tiny_model_dir), str(run_dir), tiny_tokenizer.pad_token_id,
                            fault={"die_after_report": 2, "after_s": 5, "marker": str(run_dir / "died")})
    replies, plasma, held = [], [], []
    try:
        for it in range(1, 7):
            ds = ray_local.data.from_items(_rows(tiny_tokenizer, 16, it)).materialize()
            reply = trainer.train(it, ds, PASSES, refresh_reference=False, timeout_s=600,
                                  kept={"stale_dropped": it, "staleness_hist": [16 - it, it]})
            # what the loop publishes; copies: ray.get's numpy arrays are zero-copy views that
            # would pin the object themselves
            state = {k: v.numpy().copy() for k, v in stored_items(reply.weights[0])} if it == 2 else None
            replies.append({**reply.saved(), "from_checkpoint": reply.from_checkpoint, "state": state,
                            "timing": reply.timing})
            del ds, reply, state
            held.append(ray_local.get(trainer.mailbox.held.remote()))
            plasma.append(_plasma_bytes())
    finally:
        trainer.close()
        if before is None:
            os.environ.pop(HEALTH_CHECK, None)
        else:
            os.environ[HEALTH_CHECK] = before
    return run_dir, replies, plasma, held


def test_a_rank_that_dies_between_report_and_reply_is_answered_from_the_checkpoint(trained):
    from raydpo.train.online_client import latest_iteration_checkpoint

    run_dir, replies, _, _ = trained
    assert [r.get("from_checkpoint", False) for r in replies] == [False, True, False, False, False, False]
    second = replies[1]
    assert second["steps"] == PASSES * 2 and second["pairs"] == 16 and second["metrics"]  # the lost reply's content
    assert second["kept"] == {"stale_dropped": 2, "staleness_hist": [14, 2]}  # what the driver kept, saved with it
    assert [r["kept"]["stale_dropped"] for r in replies] == [1, 2, 3, 4, 5, 6]
    saved = read_safetensors(next((run_dir / "ray_train").rglob("iter-000002")))
    for k, v in saved.items():  # the weights of the checkpoint, which is what iteration 2 trained
        np.testing.assert_array_equal(second["state"][k], v.numpy())
    assert replies[2]["step"] == second["step"] + PASSES * 2  # and training went on from there
    assert latest_iteration_checkpoint(run_dir / "ray_train", "online")[1]["iteration"] == 6


def test_the_mailbox_lets_go_of_datasets_and_weights(trained):
    _, _, plasma, held = trained
    # no reply is held; of the commands only the newest train keeps its dataset (a restart may need it)
    assert all(h == {"commands": 1, "replies": 0} for h in held)
    # each iteration makes a full weights copy (~1.7 MB, 2 MiB in Ray's rounding); the workers
    # hold the newest until the next one: nothing may pile up over the iterations
    copy = 2 * 2**20
    assert plasma[-1] <= max(plasma[:2]) + copy, [p / 2**20 for p in plasma]


def test_a_report_never_waits_for_ray_trains_health_check(trained):
    """Ray Train's controller takes a worker's report off a one-slot queue once per health
    check, and the next report waits for the slot: an online iteration took at least one
    interval (0.5 s in a local Ray, 2 s by default on a cluster). The online trainer's own
    controller checks every ONLINE_HEALTH_CHECK_S, whatever the driver asked for."""
    from raydpo.train.online_client import ONLINE_HEALTH_CHECK_S

    _, replies, _, _ = trained
    reports = [r["timing"]["checkpoint"] for r in replies[2:]]  # iterations 3-6, after the restart
    assert max(reports) < ONLINE_HEALTH_CHECK_S + 0.4 < HEALTH_CHECK_S / 2, reports
