"""Plumbing shared by the job entrypoints in jobs/: arguments and config, Ray
start-up, the base model, reading + tokenizing data, a results table."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from raydpo.config import ConfigError, RunConfig, load_config, save_config


def job_config(description: str, argv: list[str] | None = None) -> RunConfig:
    """Parse ``[--config FILE] [key=value ...]``, validate, save to run_dir. Exits 2 on a bad config."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="YAML config; omitted keys keep their defaults")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. trainer.lr=1e-5")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        run_dir = outliving_path(cfg.run_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    save_config(cfg, run_dir)
    print(f"run_dir: {run_dir}", flush=True)
    return cfg


# `ray job submit --working-dir DIR` runs the entrypoint in Ray's copy of DIR:
# <Ray temp dir>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>/
RAY_WORKING_DIR_COPY = os.path.join("runtime_resources", "working_dir_files")


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


def role_needs(cfg: RunConfig, roles: tuple[str, ...]) -> list[tuple[str, int, float, float]]:
    """(role, count, CPUs each, GPUs each) for the cluster.* roles that run together."""
    return [(r, getattr(cfg.cluster, r).count, getattr(cfg.cluster, r).cpus, getattr(cfg.cluster, r).gpus)
            for r in roles if getattr(cfg.cluster, r).count > 0]


def needed_cpus(needs: list[tuple[str, int, float, float]], data_cpus: float = 0.0) -> float:
    return sum(c * cpu for _, c, cpu, _ in needs) + data_cpus


def check_cluster_fits(needs: list[tuple[str, int, float, float]], nodes: list[dict], data_cpus: float = 0.0) -> None:
    """Fail in seconds, with the numbers and the knobs, when the roles that must be up
    together can never be placed: a Ray Train worker group or an actor that does not
    fit waits forever (Ray keeps the request pending for an autoscaler), and the job
    would hang. `nodes` is ray.nodes(); only alive nodes count. `data_cpus`: what Ray
    Data tasks need beside the actors while they run (the online loop reads its store)."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    have_cpu = sum(r.get("CPU", 0.0) for r in alive)
    have_gpu = sum(r.get("GPU", 0.0) for r in alive)
    need_cpu = needed_cpus(needs, data_cpus)
    need_gpu = sum(c * gpu for _, c, _, gpu in needs)
    shown = ", ".join(f"{r} {c} x {cpu:g} CPU" + (f" + {gpu:g} GPU" if gpu else "") for r, c, cpu, gpu in needs)
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
    for role, _, cpu, gpu in needs:  # one worker, engine or replica must fit on one node
        if not any(r.get("CPU", 0.0) + 1e-9 >= cpu and r.get("GPU", 0.0) + 1e-9 >= gpu for r in alive):
            problems.append(f"no node can hold one {role} ({cpu:g} CPU" + (f" + {gpu:g} GPU" if gpu else "") + ")")
    if problems:
        raise ConfigError(f"{where}, but " + "; ".join(problems) + ". " + knobs)


# For a local Ray that this process starts (no dashboard):
# * RAY_API_SERVER_ADDRESS: Ray Train's PlacementGroupCleaner asks the state API every
#   second whether the Train controller is alive. With no address set, the state API
#   looks up /tmp/ray/ray_current_cluster, which names the last `ray start` cluster, not
#   ours. Measured: a stale entry (a killed `ray start`) made every fit() wait 10-12 s at
#   its end for that lookup to time out; a live one would answer about the wrong cluster
#   and the cleaner would remove our placement group. A refused port makes the query
#   fail at once, which the cleaner tolerates (it keeps monitoring), as with no dashboard.
# * RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: the controller polls its workers every 2 s by
#   default, so each fit() ended 2-4 s after its last checkpoint; 0.5 s polls cost nothing
#   measurable next to training.
# * RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0: the watcher is one more actor process per fit()
#   that polls for nodes being drained (spot instances, autoscaler scale-down); a local
#   Ray on this machine has no other node and nothing that drains it.
# A cluster we join (RAY_ADDRESS, `ray job submit`) keeps its own settings.
LOCAL_RAY_RUNTIME_ENV = {"env_vars": {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:1",
                                      "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                                      "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}}


def init_ray(cfg: RunConfig, roles: tuple[str, ...] = ("trainer",), data_cpus: float = 0.0) -> None:
    """Join cluster.address or RAY_ADDRESS if given (``auto``: the cluster `ray start`
    started on this machine), else start a new local Ray; then check that the
    cluster.* `roles` that run together fit (`check_cluster_fits`).

    A local Ray gets cluster.num_cpus logical CPUs, or, if unset, one per core, or
    more if those roles need more. The online loop's phases run one after another,
    so its long-lived roles can share the cores they reserve between them.
    """
    import math

    import ray

    if ray.is_initialized():
        return
    needs = role_needs(cfg, roles)
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        num_cpus = cfg.cluster.num_cpus
        need = math.ceil(needed_cpus(needs, data_cpus))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if num_cpus is None and need > cores:  # else Ray counts the cores itself (cgroup-aware)
            num_cpus = need
        # address="local": always a new local Ray. A bare ray.init() would instead join
        # whatever /tmp/ray/ray_current_cluster names, and hang on a stale entry left by
        # a cluster that was killed. To join a `ray start` cluster, set RAY_ADDRESS=auto.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=LOCAL_RAY_RUNTIME_ENV)
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    if cfg.cluster.check_resources:
        check_cluster_fits(needs, ray.nodes(), data_cpus)


def base_model(cfg: RunConfig) -> Path:
    """model.path, or the tiny model built (once) into <run_dir>/base_model."""
    if cfg.model.path:
        # absolute: the policy app, which outlives a submitted job, serves it from its own directory
        p = outliving_path(cfg.model.path, "model.path")
        if not (p / "config.json").exists():
            raise ConfigError(f"model.path: {p} is not a Hugging Face model folder (no config.json)")
        return p
    from raydpo.tasks import style
    from raydpo.tiny_model import build_tiny_model

    out = outliving_path(cfg.run_dir) / "base_model"
    if not (out / "model.safetensors").exists():
        build_tiny_model(style.corpus(cfg.seed), out, cfg.model.tiny, seed=cfg.seed)
    return out


def read_validated(cfg: RunConfig, source):
    """Validate on Ray Data (the report is printed); the good records, not yet tokenized."""
    from raydpo.data.pipeline import read_pairs

    good, report = read_pairs(source, cfg.data.format, cfg.data.strict)
    print(report.summary())
    for bad in report.examples[:5]:
        print(f"  e.g. {bad}")
    if report.good == 0:
        raise ConfigError(f"data.train_path: no usable records in {source}")
    return good


def print_truncation(ds) -> None:
    from raydpo.data.pipeline import truncation_counts

    cut = truncation_counts(ds)
    print(f"truncated: {cut['prompt_truncated']} prompts (end kept), {cut['response_truncated']} pairs' responses (cut)")


def read_tokenized(cfg: RunConfig, source, tokenizer_path: Path):
    """Validate (report printed) and tokenize on Ray Data; a materialized dataset."""
    from raydpo.data.pipeline import tokenize

    ds = tokenize(read_validated(cfg, source), str(tokenizer_path), cfg.data.max_prompt_length, cfg.data.max_length,
                  trust_remote_code=cfg.model.trust_remote_code, tasks=True).materialize()
    print_truncation(ds)
    return ds


# Files that decide how text becomes token ids: a changed tokenizer or chat template
# changes every cached log-prob even when the weights and the data are the same.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def reference_cache_key(model: Path, data: Path, *settings) -> str:
    """Key of the cached reference log-probs: model and data paths, every data file's and
    weight file's size and modification time (a file rewritten in place is a new key), the
    contents of the tokenizer files and chat template, and the settings that change the
    tokens or the precision."""
    from raydpo.data.formats import list_files

    files = list_files(str(data)) + sorted(str(f) for f in Path(model).glob("*.safetensors"))
    stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    tokenizer = [(n, hashlib.sha256((Path(model) / n).read_bytes()).hexdigest())
                 for n in TOKENIZER_FILES if (Path(model) / n).is_file()]
    parts = [str(model), str(data), stats, tokenizer, *map(str, settings)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def cached_dataset(cache: Path, compute):
    """The Parquet dataset at `cache`, or `compute()` written there atomically: into a
    temporary sibling folder first, renamed into place once complete. A killed write leaves
    only the temporary folder (removed next time), never a half-written cache that a rerun
    would add to. Returns (dataset, whether it came from the cache)."""
    import shutil

    import ray.data

    if (cache / "_SUCCESS").exists():
        return ray.data.read_parquet(str(cache)).materialize(), True
    for stale in [cache, *cache.parent.glob(f"{cache.name}.tmp-*")]:  # a killed or pre-atomic write
        shutil.rmtree(stale, ignore_errors=True)
    ds = compute().materialize()
    tmp = cache.parent / f"{cache.name}.tmp-{os.getpid()}"
    ds.write_parquet(str(tmp))
    (tmp / "_SUCCESS").touch()
    tmp.replace(cache)
    return ds, False


def print_table(title: str, rows: list[tuple[str, str]], run_dir: str | None = None) -> None:
    """The short table a job ends with; the absolute run_dir last, when given."""
    if run_dir is not None:
        rows = [*rows, ("run_dir", str(Path(run_dir).resolve()))]
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows))


def last_metrics(run_dir: str | Path, prefix: str) -> dict:
    """Last logged value of each `prefix`-ed metric in <run_dir>/metrics.jsonl."""
    out: dict = {}
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        for line in open(path):
            rec = json.loads(line)
            mine = {k[len(prefix):]: v for k, v in rec.items() if k.startswith(prefix)}
            if mine:  # a line of this stage (SFT and DPO lines share the file)
                out.update(mine, step=rec["step"])
    return out
