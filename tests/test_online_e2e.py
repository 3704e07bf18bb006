"""The online loop end to end, as users run it. One module on purpose: under
`pytest -n 2` a module stays on one worker, and these loop-starting tests side by
side on 2 cores slowed each other 2-3x (stop/resume: 218 s alone, 553 s beside the
kill test).

1. `python jobs/online_dpo.py`, killed (driver and its local Ray) and resumed: every
   judged pair exactly once. That the same run stores the same pairs again, on one node
   or on three with one killed, is tests/test_multinode.py.
2. The README's cluster recipe, as written: `bash cluster/local.sh`, then jobs
   submitted with the `ray job submit` CLI. Token authentication is really on, a
   relative run_dir and a cluster too small for the roles fail in seconds with what to
   change, and the loop, stopped with `ray job stop` and submitted again with --resume,
   finishes every iteration with its policy endpoint serving the final version."""

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

from tests.helpers.online import check_run, small_config
from tests.helpers.proc import REPO, free_port, kill_and_wait, run_py

pytestmark = pytest.mark.slow  # starts Ray, vLLM or Serve, or trains: `make test-fast` leaves it out

VENV_BIN = str(Path(sys.executable).parent)


def _kill_tree(pid: int) -> None:
    procs = [psutil.Process(pid)]
    try:
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    kill_and_wait(procs)


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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`bash cluster/local.sh` on a machine that has never run Ray (HOME without a token),
    on free ports: the tests' own Ray (ray_local) already holds the defaults, e.g. the
    dashboard agent's 52365, and a head whose agent cannot bind refuses job submissions.
    With --block, in its own process group, so that teardown stops only this cluster."""
    tmp = tmp_path_factory.mktemp("cluster")
    home = tmp / "home"
    home.mkdir()
    gcs, dash = free_port(), free_port()
    ports = [f"--port={gcs}", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             f"--metrics-export-port={free_port()}", "--block"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["HOME"] = str(home)  # no ~/.ray/auth_token yet: a fresh machine
    head = subprocess.Popen(["bash", "cluster/local.sh", *ports], cwd=REPO, env=env, stdout=open(tmp / "head.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    client = {**env, "PATH": f"{VENV_BIN}:{env['PATH']}", "RAY_ADDRESS": f"http://127.0.0.1:{dash}"}
    authed = {**client, "RAY_AUTH_MODE": "token"}
    deadline = time.time() + 120
    while subprocess.run(["ray", "job", "list"], env=authed, capture_output=True).returncode != 0:
        assert time.time() < deadline and head.poll() is None, (tmp / "head.log").read_text()[-2000:]
        time.sleep(2)
    yield {"client": client, "authed": authed, "home": home, "log": tmp / "head.log"}
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


def submit(env, *entrypoint, wait=True, submission_id=None, timeout=900):
    cmd = ["ray", "job", "submit", "--working-dir", str(REPO)]
    if submission_id:
        cmd += ["--submission-id", submission_id]
    if not wait:
        cmd.append("--no-wait")
    deadline = time.time() + 120
    while True:  # the head answers `ray job list` a little before its job agent takes submissions
        r = subprocess.run([*cmd, "--", *entrypoint], env=env, capture_output=True, text=True, timeout=timeout)
        out = r.stdout + r.stderr
        if "submitted successfully" in out or "Authentication required" in out or time.time() > deadline:
            return r
        time.sleep(3)  # refused before the job existed: nothing ran, submitting again is safe


def job_status(env, submission_id) -> str:
    r = subprocess.run(["ray", "job", "status", submission_id], env=env, capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


def test_token_auth_is_on_after_local_sh(cluster):
    assert (cluster["home"] / ".ray" / "auth_token").read_text().strip()  # local.sh wrote one: there was none
    refused = submit(cluster["client"], "python", "-c", "print('ran')")  # no RAY_AUTH_MODE: no token sent
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "Unauthorized: Missing authentication token" in out, out[-2000:]
    assert "ran" not in refused.stdout
    ok = submit(cluster["authed"], "python", "-c", "import raydpo, sys; print('ran with', sys.executable)")
    assert ok.returncode == 0 and "ran with" in ok.stdout, (ok.stdout + ok.stderr)[-2000:]
    assert ".venv/bin/python" in ok.stdout  # local.sh put the venv first: a job's `python` has raydpo


def test_relative_run_dir_and_a_cluster_too_small_fail_in_seconds(cluster, tmp_path):
    t = time.time()
    r = submit(cluster["authed"], "python", "jobs/online_dpo.py", "run_dir=runs/x")
    assert r.returncode != 0, r.stdout[-2000:]
    assert "inside Ray's copy of the job's working directory" in r.stdout and "run_dir=$PWD/runs/x" in r.stdout
    r = submit(cluster["authed"], "python", "jobs/online_dpo.py", f"run_dir={tmp_path / 'big'}",
               "cluster.trainer.cpus=64", "cluster.sampler.gpus=1")
    assert r.returncode != 0, r.stdout[-2000:]
    cores = len(os.sched_getaffinity(0))  # what `nproc` in local.sh counts
    assert f"the Ray cluster has {max(cores, 6)} CPUs and 0 GPUs" in r.stdout, r.stdout[-2000:]
    assert "need 67.5 CPUs (trainer 1 x 64 CPU, sampler 1 x 1 CPU + 1 GPU" in r.stdout
    assert "they need 1 GPUs" in r.stdout and "no node can hold one trainer (64 CPU)" in r.stdout
    assert "--num-cpus" in r.stdout
    assert time.time() - t < 120  # seconds each, not a hang until someone stops the job


def test_loop_stopped_and_resumed_as_submitted_jobs(cluster, tmp_path):
    """Also the shortened main job, sampling ahead (loop.max_staleness=1; the synchronous
    loop's kill and resume is the test above): the embedded demo with SFT 300 steps, 3
    iterations of 64 prompts and 64 eval prompts. The policy must clearly beat its start:
    iteration 0 (the starting policy against its own fixed samples) sits near 0.5 with a few
    points of noise. The stop lands while pairs of the next iteration may already be stored:
    after the resume every judged pair is in the store exactly once."""
    env = cluster["authed"]
    run_dir, serve_port = tmp_path / "run", free_port()
    args = ["python", "jobs/online_dpo.py",
            *small_config(run_dir, serve_port, **{"loop.iterations": 3, "loop.prompts_per_iteration": 64,
                                                  "loop.chunk_prompts": 16, "loop.eval_prompts": 64,
                                                  "trainer.sft_steps": 300, "trainer.sft_batch_size": 64,
                                                  "loop.max_staleness": 1})]
    r = submit(env, *args, wait=False, submission_id="first")
    assert "submitted successfully" in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
    # stop once iteration 1 has judged its first chunk. An iteration takes a few seconds here,
    # and so do `ray job status` and `ray job stop` (each a CLI start), so a plain stop could
    # land after the last iteration (it did once in CI): freeze the driver first, then stop
    # the job; Ray's SIGTERM waits on the frozen process and its SIGKILL 3 s later ends it
    target = run_dir / "preferences" / "iteration=000001" / "chunk-00000.parquet"
    metrics = run_dir / "online_metrics.jsonl"  # iteration 0's row: evaluated beside the first sampling
    deadline, checked = time.time() + 900, 0.0
    while not (target.exists() and metrics.exists() and metrics.read_text().count("\n") >= 1):
        if time.time() - checked > 10:
            status, checked = job_status(env, "first"), time.time()
            assert "RUNNING" in status or "PENDING" in status, status
        assert time.time() < deadline, "iteration 1 never started"
        time.sleep(0.1)
    driver = [p for p in psutil.process_iter(["cmdline"])
              if "jobs/online_dpo.py" in (p.info["cmdline"] or []) and str(run_dir) in " ".join(p.info["cmdline"])]
    assert len(driver) == 1, driver
    driver[0].send_signal(signal.SIGSTOP)
    stop = subprocess.run(["ray", "job", "stop", "first"], env=env, capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "was stopped" in job_status(env, "first")
    done = [json.loads(line)["iteration"] for line in (run_dir / "online_metrics.jsonl").read_text().splitlines()]
    assert done == list(range(len(done))) and 1 <= len(done) <= 3, done  # stopped mid-run
    kept = {f: pq.read_table(f).column("pair_id").to_pylist()
            for f in (run_dir / "preferences").glob("iteration=*/chunk-*.parquet")}  # some perhaps sampled ahead

    r = submit(env, *args, "--resume", submission_id="second")  # the Serve apps of the first job are still up
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert f"resuming at iteration {len(done)}" in r.stdout and "final win rate vs the starting policy" in r.stdout
    assert f"run_dir: {run_dir}" in r.stdout  # absolute, printed at the start and the end
    raw = check_run(run_dir, iterations=3, prompts=64, chunks=4, max_staleness=1)
    for f, ids in kept.items():  # judged before the stop: kept as they were, not sampled or judged again
        assert pq.read_table(f).column("pair_id").to_pylist() == ids
    assert sum(r["staleness_hist"][1] for r in raw[2:]) > 0  # iterations 2-3 were sampled while 1-2 trained
    assert 0.35 <= raw[0]["win_rate"] <= 0.65  # the starting policy against itself
    assert raw[-1]["win_rate"] >= 0.65 and raw[-1]["win_rate"] > raw[0]["win_rate"] + 0.15, raw
    assert raw[-1]["judge_score"] > raw[0]["judge_score"]
    # the judge app outlives the job on the cluster, on loopback only
    import httpx

    ident = httpx.get(f"http://127.0.0.1:{serve_port}/judge/v1/judge", timeout=10).json()
    assert ident["judge"] == "rule:raydpo.tasks.style:score" and ident["pairwise"] is False
    # and so does the policy endpoint, serving the last iteration's weights the loop published
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{serve_port}/policy/v1", api_key="unused", max_retries=0)
    reply = client.completions.create(model="policy", prompt="about: apple | max 5\n", max_tokens=8)
    assert reply.system_fingerprint == "raydpo-policy-v3" and reply.choices[0].text
