"""The online loop submitted with the `ray job submit` CLI to a real `ray start --head`
cluster, as the README's cluster section does."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers.online import check_run, small_config
from tests.helpers.proc import REPO, free_port

VENV_BIN = str(Path(sys.executable).parent)


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
