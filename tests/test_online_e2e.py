"""The online loop end to end, as users run it: submitted with the `ray job submit`
CLI to a real `ray start --head` cluster; and killed and resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from raydpo.data.store import PreferenceStore
from tests.helpers.proc import REPO, free_port, run_py

VENV_BIN = str(Path(sys.executable).parent)


def small_config(run_dir: Path, serve_port: int, **extra) -> list[str]:
    args = {"run_dir": str(run_dir), "loop.iterations": 2, "loop.prompts_per_iteration": 16, "loop.chunk_prompts": 4,
            "loop.eval_prompts": 24, "trainer.sft_steps": 40, "trainer.sft_batch_size": 32, "cluster.port": serve_port,
            "cluster.trainer.cpus": 2, **extra}
    return [f"{k}={v}" for k, v in args.items()]


def check_run(run_dir: Path, iterations: int, prompts: int, chunks: int) -> list[dict]:
    """What every finished run must hold, consistent across store, checkpoints, metrics and report."""
    raw = [json.loads(line) for line in (run_dir / "online_metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in raw] == list(range(iterations + 1))  # each iteration once, in order
    table = PreferenceStore(run_dir / "preferences").read_table()
    rows = table.to_pylist()
    assert len({r["pair_id"] for r in rows}) == len(rows) > 0  # no duplicates
    for it in range(1, iterations + 1):
        mine = [r for r in rows if r["iteration"] == it]
        assert all(r["policy_version"] == it - 1 for r in mine)  # sampled by the previous iteration's weights
        assert len(mine) == raw[it]["pairs"]  # the metrics count what the store holds
        assert raw[it]["pairs"] <= prompts  # best vs worst: at most one pair per prompt
        files = sorted((run_dir / "preferences" / f"iteration={it:06d}").glob("chunk-*.parquet"))
        assert [f.name for f in files] == [f"chunk-{c:05d}.parquet" for c in range(chunks)]
        ckpt = run_dir / "ray_train" / "online" / f"iter-{it:06d}"
        assert (ckpt / "model.safetensors").exists() and (ckpt / "tokenizer.json").exists()
        assert json.loads((ckpt / "trainer_state.json").read_text())["iteration"] == it
        assert 0.0 <= raw[it]["win_rate"] <= 1.0 and raw[it]["wins"] + raw[it]["ties"] + raw[it]["losses"] > 0
        assert raw[it]["time_total"] >= raw[it]["time_train"] > 0
    assert all(r["chosen_score"] > r["rejected_score"] for r in rows)
    assert not list((run_dir / "preferences" / "_staging").glob("*"))
    assert (run_dir / "report" / "report.md").exists() and (run_dir / "report" / "metrics.png").exists()
    assert (run_dir / "config.yaml").exists()
    return raw


@pytest.fixture
def ray_head(tmp_path):
    """A real one-node cluster from `ray start --head --block`, in its own process group
    (so teardown stops only it, not the tests' own Ray)."""
    gcs, dash = free_port(), free_port()
    # every port of its own: the tests' own Ray (ray_local) already holds the defaults, e.g. the
    # dashboard agent's 52365, and a head whose agent cannot bind refuses job submissions
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=6", "--disable-usage-stats",
         *agent_ports],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    env.update(RAY_ADDRESS=f"http://127.0.0.1:{dash}", RAY_AUTH_MODE="token")
    deadline = time.time() + 120
    while subprocess.run(["ray", "job", "list"], env=env, capture_output=True).returncode != 0:
        assert time.time() < deadline and head.poll() is None, (tmp_path / "head.log").read_text()[-2000:]
        time.sleep(2)
    yield env
    os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its cluster on SIGTERM ...
    try:
        head.wait(10)
    except subprocess.TimeoutExpired:  # ... but measured: with Serve apps up it was still there after 60 s
        pass
    try:  # and nothing of it may outlive the test: later tests start their own local Ray
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    # `ray start` named itself in /tmp/ray/ray_current_cluster; a killed head leaves that entry
    # behind, pointing at nothing (`ray stop` would have removed it)
    from ray._common.utils import reset_ray_address

    reset_ray_address()
    # wait for the head's own processes only (its session, from start_new_session): the tests'
    # local Ray has a gcs_server and raylet too, and waiting on those cost the full 30 s every run
    def head_processes() -> list:
        left = []
        for p in psutil.process_iter(["name"]):
            try:
                if p.info["name"] in ("gcs_server", "raylet") and os.getsid(p.pid) == head.pid:
                    left.append(p)
            except (ProcessLookupError, PermissionError):
                pass
        return left

    deadline = time.time() + 30
    while head_processes() and time.time() < deadline:
        time.sleep(0.5)


def test_loop_as_a_submitted_ray_job(ray_head, tmp_path):
    """Also the shortened main job: the embedded demo with SFT 300 steps, 3 iterations of
    64 prompts and 64 eval prompts. The full demo reaches >= 0.65 (printed by `make demo`);
    here the policy must clearly beat its start: iteration 0 (the starting policy against
    its own fixed samples) sits near 0.5 with a few points of noise."""
    run_dir, serve_port = tmp_path / "run", free_port()
    cmd = ["ray", "job", "submit", "--working-dir", str(REPO), "--", "python", "jobs/online_dpo.py",
           *small_config(run_dir, serve_port, **{"loop.iterations": 3, "loop.prompts_per_iteration": 64,
                                                 "loop.chunk_prompts": 16, "loop.eval_prompts": 64,
                                                 "trainer.sft_steps": 300, "trainer.sft_batch_size": 64})]
    deadline = time.time() + 120
    while True:  # the head answers `ray job list` a little before its job agent takes submissions
        r = subprocess.run(cmd, env=ray_head, capture_output=True, text=True, timeout=900)
        accepted = "submitted successfully" in r.stdout + r.stderr
        if accepted or time.time() > deadline:
            break
        time.sleep(3)  # refused before the job existed: nothing ran, submitting again is safe
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "final win rate vs the starting policy" in r.stdout
    raw = check_run(run_dir, iterations=3, prompts=64, chunks=4)
    assert 0.35 <= raw[0]["win_rate"] <= 0.65  # the starting policy against itself
    assert raw[-1]["win_rate"] >= 0.65 and raw[-1]["win_rate"] > raw[0]["win_rate"] + 0.15, raw
    assert raw[-1]["judge_score"] > raw[0]["judge_score"]
    # the judge app outlives the job on the cluster, on loopback only
    import httpx

    ident = httpx.get(f"http://127.0.0.1:{serve_port}/judge/v1/judge", timeout=10).json()
    assert ident["judge"] == "rule:raydpo.tasks.style:score"
    # and so does the policy endpoint, serving the last iteration's weights the loop published
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{serve_port}/policy/v1", api_key="unused", max_retries=0)
    reply = client.completions.create(model="policy", prompt="about: apple | max 5\n", max_tokens=8)
    assert reply.system_fingerprint == "raydpo-policy-v3" and reply.choices[0].text


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
