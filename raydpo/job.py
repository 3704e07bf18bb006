"""The one job runner: every entry point in jobs/ (and `raydpo online`) is a `main(cfg, args)`
run by `run_job`, which parses ``[--config FILE] [--verbose] [key=value ...]``, loads and
checks the config, saves it to <run_dir>/config.yaml, and maps a `RaydpoError` to one
line on stderr and its exit code (`raydpo.errors.exit_code`); anything else keeps its
traceback. The steps every job shares (the base model, the closing table) live here too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from raydpo import console
from raydpo.errors import RaydpoError, exit_code


def parser(description: str, prog: str | None = None, resume: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML config; omitted keys keep their (demo) defaults")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue the run in run_dir where it stopped")
    p.add_argument("--verbose", action="store_true", help="also show Ray's, vLLM's and the libraries' own logs")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. trainer.lr=1e-5")
    return p


def run_job(main: Callable, description: str, argv: list[str] | None = None, *, prog: str | None = None,
            resume: bool = False, before_save: Callable | None = None) -> int:
    """Parse, load and save the config, run `main(cfg, args)`; its return value (default 0)
    is the exit status. `before_save(cfg, args)` runs before the config is written (the
    online loop checks there that run_dir may be continued)."""
    from raydpo.cluster import outliving_path
    from raydpo.config_io import load_config, save_config

    prog = prog or Path(sys.argv[0]).stem
    args = parser(description, prog, resume).parse_args(argv)
    console.setup(args.verbose)
    try:
        cfg = load_config(args.config, args.overrides)
        run_dir = outliving_path(cfg.run_dir)
        console.log(prog, f"run_dir: {run_dir}")
        if before_save:
            before_save(cfg, args)
        save_config(cfg, run_dir)
        return main(cfg, args) or 0
    except RaydpoError as e:  # named problem; its traceback only with --verbose
        if console.verbose():
            import traceback

            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return exit_code(e)


def base_model(cfg, sampled: bool = False) -> Path:
    """model.path, checked (`raydpo.model_check`), or the tiny model built (once) into
    <run_dir>/base_model. `sampled`: vLLM engines will run it (the online loop)."""
    from raydpo.cluster import outliving_path
    from raydpo.model_check import check_model_folder

    if cfg.model.path:
        # absolute: the policy app, which outlives a submitted job, serves it from its own directory
        p = outliving_path(cfg.model.path, "model.path")
        on_cpu = not cfg.cluster.sampler.gpus or (cfg.loop.serve_policy and not cfg.cluster.policy.gpus)
        check_model_folder(p, sampled_on_cpu=sampled and on_cpu, trust_remote_code=cfg.model.trust_remote_code)
        return p
    from raydpo.tasks import style
    from raydpo.tiny_model import build_tiny_model

    out = outliving_path(cfg.run_dir) / "base_model"
    if not (out / "model.safetensors").exists():
        build_tiny_model(style.corpus(cfg.seed), out, cfg.model.tiny, seed=cfg.seed)
    return out


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


def stage_rows(run_dir: str, prefix: str, extra: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """The closing table's first rows for a training stage: steps, final loss, and `extra` metrics."""
    m = last_metrics(run_dir, prefix)
    rows = [("steps", str(m.get("step"))), ("final loss", f"{m.get('loss', float('nan')):.4f}")]
    for label, key in (extra or {}).items():
        rows.append((label, f"{m.get(key, float('nan')):.3f}"))
    return rows
