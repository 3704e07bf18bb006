"""Where a job runs: joining or starting Ray, checking that the roles fit the cluster,
and paths that outlive a submitted job's working directory."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import NamedTuple

from raydpo.config import RunConfig
from raydpo.errors import ConfigError


# `ray job submit --working-dir DIR` runs the entrypoint in Ray's copy of DIR:
# <Ray temp dir>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>/
RAY_WORKING_DIR_COPY = os.path.join("runtime_resources", "working_dir_files")


def pin_cpus(cpu_ids: list[int] | None, role: str) -> None:
    """Pin this process, every thread it has and every thread it starts later, to `cpu_ids`
    (cluster.<role>.cpu_ids; None: leave it be). Linux only."""
    if cpu_ids is None:
        return
    allowed = os.sched_getaffinity(0)
    if not set(cpu_ids) <= allowed:
        raise ConfigError(f"cluster.{role}.cpu_ids={cpu_ids}: this process on {socket.gethostname()} may only "
                          f"run on CPUs {sorted(allowed)}")
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpu_ids)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def outliving_path(value: str, key: str = "run_dir", cwd: str | None = None) -> Path:
    """`value` made absolute. A path that resolves into Ray's copy of a job's working
    directory (a relative path under `ray job submit --working-dir`) is refused: that
    copy is deleted with the Ray session, and the store, checkpoints and report (or a
    model a Serve app outliving the job still needs) with it."""
    path = Path(cwd or os.getcwd(), value).resolve()  # an absolute value replaces cwd
    if RAY_WORKING_DIR_COPY in str(path):
        raise ConfigError(
            f"{key}={value} resolves to {path}, inside Ray's copy of the job's working directory, "
            f"which is deleted with the Ray session. Pass an absolute {key} on storage that outlives the "
            f"job (on a multi-node cluster, storage every node sees), e.g. {key}=$PWD/{value} on the "
            f"`ray job submit` command line (your shell expands $PWD before Ray copies anything)")
    return path


def require_shared(path: str, role: str) -> None:
    """In a role's process: `path`, which the driver wrote under run_dir (or was given), must
    exist here. On a multi-node cluster it does only if it is on storage every node sees; a
    node's own disk would show the trainer's checkpoints to the trainer alone, and the other
    roles would fail later on a missing folder, or wait for one."""
    if not os.path.exists(path):
        import ray

        node = ray.get_runtime_context().get_node_id()[:12] if ray.is_initialized() else "?"
        raise ConfigError(f"{role}: {path} does not exist on {socket.gethostname()} (Ray node {node}). "
                          f"On a multi-node cluster, run_dir (and model.path, judge.model_path) must be on storage "
                          f"every node sees at the same path: a shared filesystem such as NFS, or a volume "
                          f"mounted on every node")


def on_this_node() -> dict:
    """Actor options that place an actor on this process's node: for the driver's small
    helpers (the trainer's mailbox, the policy's weight registry), which take no CPU and so
    could land on any node. On a worker node they would die with it, and take down what
    depends on them (measured: a mailbox on the sampler's node, killed with it, ended the
    trainer workers that wait on it, and the weights they owned)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


class RoleNeed(NamedTuple):
    """What one cluster.<role> asks of the cluster: `count` of it, each reserving `cpus`,
    `gpus` and the custom Ray `resources` that place it (see Resources.resources)."""
    role: str
    count: int
    cpus: float
    gpus: float
    resources: dict[str, float]


def role_needs(cfg: RunConfig, roles: tuple[str, ...]) -> list[RoleNeed]:
    """What the cluster.* `roles` that run together need."""
    return [RoleNeed(r, getattr(cfg.cluster, r).count, getattr(cfg.cluster, r).cpus, getattr(cfg.cluster, r).gpus,
                     dict(getattr(cfg.cluster, r).resources))
            for r in roles if getattr(cfg.cluster, r).count > 0]


def needed_cpus(needs: list[RoleNeed], data_cpus: float = 0.0) -> float:
    return sum(n.count * n.cpus for n in needs) + data_cpus


def fits_one_node(shape: dict[str, float], alive: list[dict]) -> bool:
    """Whether one of the `alive` nodes' resources (ray.nodes()' "Resources") holds `shape`
    ({"CPU": .., "GPU": .., custom: ..}) whole: what one worker, engine or replica needs."""
    return any(all(r.get(k, 0.0) + 1e-9 >= v for k, v in shape.items() if v) for r in alive)


def _shape(n: RoleNeed) -> str:
    parts = [f"{n.cpus:g} CPU"] + ([f"{n.gpus:g} GPU"] if n.gpus else []) + [f"{v:g} {k}" for k, v in n.resources.items()]
    return " + ".join(parts)


def check_cluster_fits(needs: list[RoleNeed], nodes: list[dict], data_cpus: float = 0.0) -> None:
    """Fail in seconds, with the numbers and the knobs, when the roles that must be up
    together can never be placed: a Ray Train worker group or an actor that does not
    fit waits forever (Ray keeps the request pending for an autoscaler), and the job
    would hang. `nodes` is ray.nodes(); only alive nodes count. `data_cpus`: what Ray
    Data tasks need beside the actors while they run (the online loop reads its store).

    Roles placed by custom resources (cluster.<role>.resources) are also checked
    against the nodes that have them: their count of the resource, and those nodes'
    CPUs and GPUs. Placement is not solved as bin packing: roles that share such nodes
    are summed, which can only over-count what a node must hold."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    have_cpu = sum(r.get("CPU", 0.0) for r in alive)
    have_gpu = sum(r.get("GPU", 0.0) for r in alive)
    need_cpu = needed_cpus(needs, data_cpus)
    need_gpu = sum(n.count * n.gpus for n in needs)
    shown = ", ".join(f"{n.role} {n.count} x {_shape(n)}" for n in needs)
    where = (f"the Ray cluster has {have_cpu:g} CPUs and {have_gpu:g} GPUs on {len(alive)} node(s) "
             f"(largest node: {max((r.get('CPU', 0.0) for r in alive), default=0):g} CPUs)")
    knobs = ("Lower cluster.<role>.count or .cpus/.gpus, give the cluster more logical CPUs "
             "(`ray start --head --num-cpus=N`, as cluster/local.sh does; cluster.num_cpus for a local Ray), "
             "or add nodes. On an autoscaling cluster that will grow, set cluster.check_resources=false.")
    problems = []
    if need_cpu > have_cpu + 1e-9:
        data = f", + {data_cpus:g} for Ray Data tasks" if data_cpus else ""
        problems.append(f"the roles that run together need {need_cpu:g} CPUs ({shown}{data})")
    if need_gpu > have_gpu + 1e-9:
        problems.append(f"they need {need_gpu:g} GPUs ({shown})")
    for n in needs:  # one worker, engine or replica must fit on one node
        if not fits_one_node({"CPU": n.cpus, "GPU": n.gpus, **n.resources}, alive):
            problems.append(f"no node can hold one {n.role} ({_shape(n)})")
    for key in sorted({k for n in needs for k in n.resources}):
        users = [n for n in needs if n.resources.get(key)]
        holders = [r for r in alive if r.get(key, 0.0) > 0]
        if not holders:
            problems.append(f"no node has the custom resource {key!r} that cluster.{users[0].role}.resources asks for "
                            f"(start the node with `ray start ... --resources='{{\"{key}\": N}}'`)")
            continue
        for what, need, have in ((key, sum(n.count * n.resources[key] for n in users), sum(r[key] for r in holders)),
                                 ("CPUs", sum(n.count * n.cpus for n in users), sum(r.get("CPU", 0.0) for r in holders)),
                                 ("GPUs", sum(n.count * n.gpus for n in users), sum(r.get("GPU", 0.0) for r in holders))):
            if need > have + 1e-9:
                problems.append(f"{' and '.join(n.role for n in users)} need {need:g} {what} on the nodes with {key!r}, "
                                f"which have {have:g}")
    if problems:
        raise ConfigError(f"{where}, but " + "; ".join(problems) + ". " + knobs)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now, for a server that binds it a moment later.

    Drawn at random from 20000 up to the kernel's ephemeral range (ip_local_port_range,
    32768 by default), not from the kernel (bind to port 0): the kernel hands out its
    ephemeral ports to every outgoing connection and every server that binds port 0,
    which is how each Ray process picks its ports. Seconds pass between choosing a port
    and the server binding it (Ray binds its dashboard after starting its GCS), and in
    that gap a Ray starting beside us once took the kernel's pick ("Failed to bind to
    127.0.0.1:43379 because it's already occupied"). Below 20000 are `ray start`'s
    worker ports (10002-19999) and the usual fixed ones (Ray's 6379 and 8265, Serve's
    8000). SystemRandom, because a test that seeds `random` would otherwise give every
    process the same sequence."""
    import random

    low, high = 20000, _ephemeral_ports()[0]
    for port in random.SystemRandom().sample(range(low, high), min(64, max(high - low, 0))):
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # a host whose ephemeral range starts below 20000
        s.bind((host, 0))
        return s.getsockname()[1]


# ports free_port gave this process: a `ray start` takes several at once, none of them bound
# yet, and a second draw of the same one (1 in 12768) would hand it out twice
_HANDED_OUT: set[int] = set()


def _ephemeral_ports() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = f.read().split()
        return int(low), int(high)
    except (OSError, ValueError):  # not Linux: the IANA range
        return 49152, 65535


def local_ray_env(dashboard_port: int) -> dict:
    """Environment of every process of a local Ray this process starts.

    * RAY_API_SERVER_ADDRESS: our own dashboard. Ray Train's PlacementGroupCleaner asks
      the state API every second whether the Train controller is alive; without this
      address the state API looks up /tmp/ray/ray_current_cluster, which names the last
      `ray start` cluster on the machine, not ours (measured: a stale entry made every
      fit() wait 10-12 s for that lookup to time out). Pointed at a refused port, as
      before, the cleaner logged "Failed to query Ray Train Controller actor state" every
      second of every fit; with the dashboard up the query answers (a local Ray starts
      ~1 s slower with it, measured).
    * RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: the controller polls its workers every 2 s by
      default, so each fit() ended 2-4 s after its last checkpoint; 0.5 s polls cost
      nothing measurable next to training.
    * RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0: the watcher is one more actor process per
      fit() that polls for nodes being drained; a local Ray has nothing that drains it.
    A cluster we join (RAY_ADDRESS, `ray job submit`) keeps its own settings.
    """
    return {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


# A raylet warns on the driver's console ("N PYTHON worker processes have been started
# ... 4x the maximum expected startup concurrency") once it holds 4x its startup
# concurrency in worker processes, and that concurrency defaults to the node's CPUs. An
# online run holds one process per role replica, most of them 0-CPU actors (the trainer
# mailbox, Serve's controller and proxy, judge and policy replicas), so on 2 cores every
# demo crossed 8. Expecting 8 concurrent starts moves the warning to 32 processes, where
# it again means a leak; starting 20 actors took the same time either way (measured).
STARTUP_CONCURRENCY = 8


def start_local_ray(num_cpus: int | None = None, **options) -> None:
    """A new local Ray (its dashboard and state API on 127.0.0.1 only), with `local_ray_env`
    and `STARTUP_CONCURRENCY`.

    address="local": always a new local Ray. A bare ray.init() would instead join
    whatever /tmp/ray/ray_current_cluster names, and hang on a stale entry left by
    a cluster that was killed. To join a `ray start` cluster, set RAY_ADDRESS=auto."""
    import ray

    port = free_port()
    system = {"worker_maximum_startup_concurrency": max(STARTUP_CONCURRENCY, os.cpu_count() or 1),
              **options.pop("_system_config", {})}
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, runtime_env={"env_vars": local_ray_env(port)}, _system_config=system, **options)


def init_ray(cfg: RunConfig, roles: tuple[str, ...] = ("trainer",), data_cpus: float = 0.0) -> None:
    """Join cluster.address or RAY_ADDRESS if given (``auto``: the cluster `ray start`
    started on this machine), else start a new local Ray; then check that the
    cluster.* `roles` that run together fit (`check_cluster_fits`).

    A local Ray gets cluster.num_cpus logical CPUs, or, if unset, one per core, or
    more if those roles need more. The online loop's phases run one after another,
    so its long-lived roles can share the cores they reserve between them. Its
    dashboard (and state API) listens on 127.0.0.1 only.
    """
    import math

    import ray

    from raydpo import console

    if ray.is_initialized():
        return
    needs = role_needs(cfg, roles)
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **console.ray_init_options())
    else:
        num_cpus = cfg.cluster.num_cpus
        need = math.ceil(needed_cpus(needs, data_cpus))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if num_cpus is None and need > cores:  # else Ray counts the cores itself (cgroup-aware)
            num_cpus = need
        start_local_ray(num_cpus, **console.ray_init_options())
    console.after_ray_init()
    if cfg.cluster.check_resources:
        check_cluster_fits(needs, ray.nodes(), data_cpus)
