"""The online loop on a real 3-node Ray cluster on this machine, with a node killed mid-run,
against the same config on one local Ray (the baseline).

    python bench/multinode.py [--out DIR] [--return-after 5] [--no-return]

1. the baseline: `jobs/online_dpo.py`, 2 iterations, on a local Ray it starts itself;
2. a cluster of three `ray start` nodes, each with its own CPUs, custom resources and temp
   dir: the head (3 CPUs, `head_node`: judge, policy endpoint, driver, Ray Data tasks), a
   trainer node (2 CPUs, `trainer_node`) and a sampler node (1 CPU, `sampler_node`);
3. the same run on it, placed by config (cluster.<role>.resources). When iteration 2's first
   chunk is in the store, the sampler node is killed outright (SIGKILL to every process it
   has: raylet, object store, the vLLM actor), and started again `--return-after` seconds
   later. The pool replaces the engine that died, which waits for a node with
   `sampler_node`, loads the current weights and re-runs the chunk that was in flight.
   With --no-return the node stays dead: the run fails after sampler.start_timeout_s with
   an error that names what is missing; the node is then started and `--resume` finishes;
4. checks, from Ray's state API, that each role ran on its node, that the published weights
   reached more than one node through the object store, and that the store holds every
   pair of the baseline exactly once (pair ids, token ids and log-probs equal).

Ends with `RESULT nodes_used=... duplicate_pairs=... lost_pairs=... weights_nodes=...
sampler_restarts=... recovered=... cluster_s=... local_s=... ratio=...` (ratio = cluster_s /
local_s, start-up included on both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers, run as `python bench/multinode.py`

from raydpo.cluster import STARTUP_CONCURRENCY, free_port, local_ray_env  # noqa: E402
from tests.helpers.proc import kill_and_wait  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PLACED = {"trainer": "trainer_node", "sampler": "sampler_node", "judge": "head_node", "policy": "head_node"}
# the nodes: CPUs and custom resources (judge 0.5 + policy 0.5 of head_node)
NODES = {"head": (3, {"head_node": 1}), "trainer": (2, {"trainer_node": 1}), "sampler": (1, {"sampler_node": 1})}
# Ray's actor class names for each role, as the state API lists them
ACTORS = {"trainer": "RayTrainWorker", "sampler": "SamplerActor", "judge": "ServeReplica:judge",
          "policy": "ServeReplica:policy"}


_STATE_QUERY = """
import json, sys
from ray.util import state
rows = getattr(state, "list_" + sys.argv[1])(address=sys.argv[2], detail=True, limit=10000,
                                             raise_on_missing_output=False)
keys = ("node_id", "state", "resources_total", "class_name", "name")
print(json.dumps([{k: getattr(r, k, None) for k in keys} for r in rows]))
"""


class LocalCluster:
    """A real multi-node Ray cluster on one machine: `ray start --head` and `ray start
    --address` worker nodes on 127.0.0.1, each with its own CPUs, custom resources, object
    store and temp dir (removed by `stop`). Each node runs `--block`ed in its own session, so that `kill` takes
    down one node outright (SIGKILL to every process of that session) as a lost machine
    would, and `stop` leaves nothing behind.

    Token authentication stays on (`ray start --head` turns it on in Ray 2.60): every node
    and every driver gets RAY_AUTH_MODE=token and the token in ~/.ray/auth_token."""

    def __init__(self, root: Path, object_store_bytes: int = 1_000_000_000):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.object_store_bytes = object_store_bytes
        self.nodes: dict[str, subprocess.Popen] = {}
        self.temps: list[str] = []
        self.specs: dict[str, tuple[int, dict]] = {}
        self.gcs_port = self.dashboard_port = 0
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        # the cluster's own token, in the environment of its nodes, drivers and state queries:
        # `ray start` with token auth refuses to start without one, and a clean machine has no
        # ~/.ray/auth_token (cluster/local.sh writes one; this leaves the user's alone)
        self.env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                         "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
        self._dash = free_port()
        self.env.update(local_ray_env(self._dash))  # the same Ray settings as a raydpo local Ray
        self.env["RAY_worker_maximum_startup_concurrency"] = str(max(STARTUP_CONCURRENCY, os.cpu_count() or 1))
        # the GCS declares a node dead after `threshold` failed health checks `period` apart:
        # 5 x 3 s by default (measured here: ~30 s before a killed node's actors were seen
        # dead), meant for real networks; 5 x 1 s on one machine
        self.env.update({"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5"})

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def driver_env(self) -> dict:
        """The environment of a driver that joins this cluster."""
        return {**self.env, "RAY_ADDRESS": self.address}

    def start(self, nodes: dict[str, tuple[int, dict]]) -> None:
        """The first of `nodes` is the head, the others join it together; all are up when
        this returns."""
        (head, (cpus, resources)), *workers = nodes.items()
        self.add(head, cpus, resources, head=True)
        waits = [self.add(name, cpus, resources, wait=False) for name, (cpus, resources) in workers]
        for wait in waits:
            wait()

    def add(self, name: str, cpus: int, resources: dict, head: bool = False, wait: bool = True):
        """Start node `name`; with wait=False, return a function that waits for it."""
        self.specs[name] = (cpus, resources)
        # a restarted node gets a new one; short, under /tmp: Ray's socket paths in it must stay
        # within AF_UNIX's 107 bytes (a pytest tmp_path is too long)
        temp = tempfile.mkdtemp(prefix=f"rdn-{name}-", dir="/tmp")
        self.temps.append(temp)
        args = ["ray", "start", f"--num-cpus={cpus}", f"--resources={json.dumps(resources)}", f"--temp-dir={temp}",
                "--node-ip-address=127.0.0.1", f"--object-store-memory={self.object_store_bytes}",
                "--disable-usage-stats", "--block"]
        if head:
            self.gcs_port, self.dashboard_port = free_port(), self._dash
            args += ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}", f"--dashboard-agent-listen-port={free_port()}",
                     f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                     f"--metrics-export-port={free_port()}"]
        else:
            args += [f"--address={self.address}", "--dashboard-agent-listen-port=0"]
        log = self.root / f"{name}.log"
        starts = (log.read_text().count("Ray runtime started") if log.exists() else 0) + 1
        self.nodes[name] = subprocess.Popen(args, env=self.env, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                                            start_new_session=True)
        if not wait:
            return lambda: self._wait_alive(name, starts)
        self._wait_alive(name, starts)

    def _wait_alive(self, name: str, starts: int, timeout: float = 120) -> None:
        """Until node `name`'s log says it started for the `starts`-th time."""
        log = self.root / f"{name}.log"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.nodes[name].poll() is not None:
                raise RuntimeError(f"node {name} exited: {log.read_text()[-2000:]}")
            if log.read_text().count("Ray runtime started") >= starts:
                return
            time.sleep(0.5)
        raise RuntimeError(f"node {name} did not start within {timeout}s: {log.read_text()[-2000:]}")

    def state(self, what: str) -> list[dict]:
        """Ray's state API on this cluster: `what` is "nodes" or "actors" (dead ones included).
        In a child process with the cluster's environment: the client reads RAY_AUTH_MODE once,
        when Ray is imported, and this process may have its own Ray."""
        r = subprocess.run([sys.executable, "-c", _STATE_QUERY, what, self.dashboard], env=self.env,
                           capture_output=True, text=True, timeout=120)
        if r.returncode:
            raise RuntimeError(f"state API ({what}) failed: {r.stderr[-2000:]}")
        return json.loads(r.stdout)

    def node_of(self) -> dict[str, str]:
        """node id -> the name of the node that has its custom resource (dead nodes included)."""
        names = {next(iter(res)): name for name, (_, res) in self.specs.items()}
        out = {}
        for n in self.state("nodes"):
            for key, name in names.items():
                if key in n["resources_total"]:
                    out[n["node_id"]] = name
        return out

    def _processes(self, name: str) -> list[psutil.Process]:
        sid = self.nodes[name].pid
        procs = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == sid:
                    procs.append(p)
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                pass
        return procs

    def kill(self, name: str) -> int:
        """SIGKILL every process of node `name`; returns how many there were."""
        procs = self._processes(name)
        kill_and_wait(procs)
        return len(procs)

    def restart(self, name: str) -> None:
        cpus, resources = self.specs[name]
        self.add(name, cpus, resources)

    def stop(self) -> None:
        for name in reversed(list(self.nodes)):  # workers first, the head last
            try:
                os.killpg(self.nodes[name].pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.kill(name)
        # `ray start --temp-dir` wrote its ray_current_cluster there, not in /tmp/ray: nothing else to undo
        for temp in self.temps:  # sessions' logs and spilled objects; the nodes' own logs stay in root
            shutil.rmtree(temp, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def placement() -> list[str]:
    """The config that places each role on its node."""
    share = {"trainer": 1, "sampler": 1, "judge": 0.5, "policy": 0.5}
    return [f"cluster.{role}.resources={{{key}: {share[role]}}}" for role, key in PLACED.items()]


def config(run_dir: Path, port: int, serve_policy: bool = True, **extra) -> list[str]:
    """The run both sides make: the kill/resume test's small config."""
    args = {"run_dir": str(run_dir), "loop.iterations": 2, "loop.prompts_per_iteration": 16, "loop.chunk_prompts": 4,
            "loop.eval_prompts": 24, "trainer.sft_steps": 0, "trainer.sft_batch_size": 32, "cluster.port": port,
            "cluster.trainer.cpus": 2, "loop.serve_policy": str(serve_policy).lower(), **extra}
    return [f"{k}={v}" for k, v in args.items()]


def run_killing_a_node(cluster: LocalCluster, args: list[str], run_dir: Path, node: str = "sampler",
                       return_after: float | None = 5.0, log: Path | None = None,
                       timeout: float = 900) -> tuple[subprocess.CompletedProcess, dict]:
    """`jobs/online_dpo.py args` as a driver on `cluster`; when iteration 2's first chunk is
    stored, kill `node`, and start it again `return_after` seconds later (None: never).
    Returns the finished driver and what happened when."""
    log = log or run_dir.parent / f"{run_dir.name}.log"
    with open(log, "w") as out:
        driver = subprocess.Popen([sys.executable, "jobs/online_dpo.py", *args], cwd=REPO, env=cluster.driver_env(),
                                  stdout=out, stderr=subprocess.STDOUT, text=True)
        target = run_dir / "preferences" / "iteration=000002" / "chunk-00000.parquet"
        deadline, events = time.time() + timeout, {}
        try:
            while not target.exists():
                if driver.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the run ended or stalled before iteration 2: {log.read_text()[-3000:]}")
                time.sleep(0.05)
            events["killed_processes"] = cluster.kill(node)
            events["killed_at"] = time.time()
            if return_after is not None:
                time.sleep(return_after)
                cluster.restart(node)
                events["returned_at"] = time.time()
            driver.wait(timeout=max(1.0, deadline - time.time()))
        finally:  # a stall, a node that would not start, or a timeout: the driver goes too
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    text = log.read_text()
    return subprocess.CompletedProcess(driver.args, driver.returncode, text, ""), events


def where_roles_ran(cluster: LocalCluster) -> dict[str, list[str]]:
    """role -> the names of the nodes its actors ran on, from Ray's state API (dead actors too)."""
    names = cluster.node_of()
    out: dict[str, list[str]] = {}
    for a in cluster.state("actors"):
        for role, prefix in ACTORS.items():
            # an actor with no node never ran: a replacement that was cancelled when its node died
            if (a.get("class_name") or "").startswith(prefix) and a.get("node_id"):
                out.setdefault(role, []).append(names.get(a.get("node_id"), f"unknown node {a.get('node_id')}"))
    return {role: sorted(set(nodes)) for role, nodes in out.items()}


def store_pairs(run_dir: Path) -> list[dict]:
    from raydpo.data.store import PreferenceStore

    return PreferenceStore(run_dir / "preferences").read_table().to_pylist()


def compare_stores(got: list[dict], want: list[dict]) -> tuple[int, int, int]:
    """(duplicate, lost or extra, differing) pairs of `got` against the baseline `want`, by pair id;
    a pair that differs in anything but where it ran (token ids, log-probs, scores) counts."""
    by_id = {r["pair_id"]: r for r in got}
    want_ids = {r["pair_id"] for r in want}
    missing_or_extra = len(want_ids - by_id.keys()) + len(by_id.keys() - want_ids)
    differing = sum(1 for r in want if r["pair_id"] in by_id and by_id[r["pair_id"]] != r)
    return len(got) - len(by_id), missing_or_extra, differing


def report_value(run_dir: Path, key: str) -> str:
    for line in (run_dir / "report" / "report.md").read_text().splitlines():
        if line.startswith(f"- {key}: "):
            return line.split(": ", 1)[1]
    return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="keep the runs and node logs here (default: a temporary folder)")
    ap.add_argument("--return-after", type=float, default=5.0, help="seconds the killed node stays down")
    ap.add_argument("--no-return", action="store_true", help="the killed node stays down until the run fails; "
                    "then it is started again and the run resumed")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="raydpo-multinode-"))

    print("[bench] baseline: the same run on one local Ray ...", flush=True)
    t = time.time()
    local = subprocess.run([sys.executable, "jobs/online_dpo.py", *config(out / "local", free_port())], cwd=REPO,
                           capture_output=True, text=True)
    local_s = time.time() - t
    if local.returncode:
        sys.exit(f"baseline failed:\n{(local.stdout + local.stderr)[-3000:]}")

    print("[bench] 3-node cluster: head, trainer node, sampler node ...", flush=True)
    with LocalCluster(out / "nodes") as cluster:
        cluster.start(NODES)
        run_dir = out / "cluster"
        extra = {"sampler.start_timeout_s": 60} if args.no_return else {}
        run_args = config(run_dir, free_port(), **extra) + placement()
        t = time.time()
        done, events = run_killing_a_node(cluster, run_args, run_dir, "sampler",
                                          None if args.no_return else args.return_after)
        first_error = ""
        if args.no_return:
            first_error = next((line for line in done.stdout.splitlines() if "did not start within" in line), "")
            print(f"[bench] the run with the sampler node down: exit {done.returncode}: {first_error}", flush=True)
            cluster.restart("sampler")
            done = subprocess.run([sys.executable, "jobs/online_dpo.py", *run_args, "--resume"], cwd=REPO,
                                  env=cluster.driver_env(), capture_output=True, text=True)
        cluster_s = time.time() - t
        if done.returncode:
            sys.exit(f"the cluster run failed:\n{(done.stdout + done.stderr)[-3000:]}")
        placed = where_roles_ran(cluster)
        nodes_used = len(set(cluster.node_of().values()))  # a restarted node is a new node id

    dup, lost, differing = compare_stores(store_pairs(run_dir), store_pairs(out / "local"))
    weights_nodes = report_value(run_dir, "nodes holding the last weights")
    restarts = report_value(run_dir, "sampler restarts")
    print("\n| role | configured node | ran on (state API) |")
    print("|---|---|---|")
    for role, key in PLACED.items():
        want = next(n for n, (_, res) in NODES.items() if key in res)
        print(f"| {role} | {want} | {', '.join(placed.get(role, ['-']))} |")
    print(f"\nsampler node killed ({events['killed_processes']} processes)"
          + (f", back after {events['returned_at'] - events['killed_at']:.1f}s" if "returned_at" in events else
             f", kept down: {first_error}"))
    print(f"pairs: {len(store_pairs(run_dir))} stored, baseline {len(store_pairs(out / 'local'))}; "
          f"duplicates {dup}, lost or extra {lost}, differing from the baseline {differing}")
    print(f"wall: cluster {cluster_s:.0f}s, one local Ray {local_s:.0f}s | runs and node logs: {out}")
    ok = all(placed.get(role) == [next(n for n, (_, res) in NODES.items() if key in res)]
             for role, key in PLACED.items())
    print(f"RESULT nodes_used={nodes_used} placed_as_configured={int(ok)} duplicate_pairs={dup} lost_pairs={lost} "
          f"differing_pairs={differing} weights_nodes={weights_nodes} sampler_restarts={restarts} "
          f"recovered={int(not args.no_return)} cluster_s={cluster_s:.0f} local_s={local_s:.0f} "
          f"ratio={cluster_s / local_s:.2f}")


if __name__ == "__main__":
    main()
