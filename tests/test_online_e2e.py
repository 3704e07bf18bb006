"""The online loop run as `python jobs/online_dpo.py`, killed (driver and its local Ray)
and resumed: every judged pair exactly once; and reproducible, run after run."""

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

from raydpo.data.store import PreferenceStore
from tests.helpers.online import check_run, small_config
from tests.helpers.proc import REPO, free_port, run_py


def _kill_tree(pid: int) -> None:
    procs = [psutil.Process(pid)]
    try:
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def test_killed_driver_resumes_with_every_pair_exactly_once(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "jobs/online_dpo.py", *small_config(run_dir, free_port(), **{
        "loop.iterations": 3, "trainer.sft_steps": 0, "cluster.num_cpus": 6,
        "loop.serve_policy": "false"})]  # the policy endpoint is checked in the submitted-job test
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    target = run_dir / "preferences" / "iteration=000002" / "chunk-00000.parquet"
    deadline = time.time() + 600
    while not target.exists():
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "iteration 2 never started"
        time.sleep(0.05)
    _kill_tree(first.pid)  # the driver and the local Ray it started: nothing gets to clean up
    done = [json.loads(line)["iteration"] for line in (run_dir / "online_metrics.jsonl").read_text().splitlines()]
    assert done == [0, 1]  # killed inside iteration 2
    kept = {f.name: pq.read_table(f).column("pair_id").to_pylist()
            for f in (run_dir / "preferences" / "iteration=000002").glob("chunk-*.parquet")}

    r = run_py([*args[1:], "--resume"], timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "resuming at iteration 2" in r.stdout
    raw = check_run(run_dir, iterations=3, prompts=16, chunks=4)
    # chunks judged before the kill are kept as they were, not sampled again
    for name, ids in kept.items():
        assert pq.read_table(run_dir / "preferences" / "iteration=000002" / name).column("pair_id").to_pylist() == ids
    # training continued from iteration 1's checkpoint: the step counter goes on, never repeats
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    online = [(s["step"], s["online/iteration"]) for s in steps if "online/iteration" in s]
    assert [s for s, _ in online] == sorted({s for s, _ in online})
    assert {i for _, i in online} == {1, 2, 3}
    assert raw[3]["train_steps"] > 0
    # and a run_dir that holds a run is not silently overwritten without --resume
    again = run_py(args[1:], timeout=300)
    assert again.returncode == 2 and "pass --resume" in again.stderr

    # Reproducible: the same config run again, straight through 2 iterations, stores the same
    # pairs (ids, texts, token ids, log-probs) and writes the same metrics rows as the run that
    # was killed and resumed; every sample's seed depends on what it is, not on when it ran.
    straight = tmp_path / "straight"
    r = run_py(["jobs/online_dpo.py", *small_config(straight, free_port(), **{"loop.iterations": 2, "trainer.sft_steps": 0,
                                                        "cluster.num_cpus": 6, "loop.serve_policy": "false"})],
               timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    a, b = _pairs(run_dir, upto=2), _pairs(straight, upto=2)
    assert len(a) == len(b) > 0 and a == b
    untimed = [{k: v for k, v in row.items() if not k.startswith("time_")} for row in raw[:3]]
    again_rows = [json.loads(line) for line in (straight / "online_metrics.jsonl").read_text().splitlines()]
    assert untimed == [{k: v for k, v in row.items() if not k.startswith("time_")} for row in again_rows]


def _pairs(run_dir: Path, upto: int) -> list[dict]:
    rows = PreferenceStore(run_dir / "preferences").read_table().to_pylist()
    return sorted((r for r in rows if r["iteration"] <= upto), key=lambda r: r["pair_id"])
