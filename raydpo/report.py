"""The online run's report: per-iteration metrics as a table, PNG plots and a
markdown summary (matplotlib, headless). Reads only <run_dir>/online_metrics.jsonl,
so `raydpo report RUN_DIR` can redraw it for any run, finished or not."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from raydpo.errors import DataError

METRICS_FILE = "online_metrics.jsonl"
TIME_KEYS = ("sample", "judge", "store", "wait", "train", "sync", "eval", "other")  # wait: the trainer for pairs (max_staleness > 0)

# (column title, key, format) of the per-iteration table
COLUMNS = (
    ("iter", "iteration", "{:d}"),
    ("pairs", "pairs", "{:d}"),
    ("win vs start", "win_rate", "{:.3f}"),
    ("judge score", "judge_score", "{:.3f}"),
    ("resp. tokens", "response_tokens", "{:.1f}"),
    ("KL", "kl", "{:.2f}"),
    ("reward acc", "reward_accuracy", "{:.2f}"),
    ("margin", "reward_margin", "{:.3f}"),
    ("seconds", "time_total", "{:.1f}"),
)


def append_metrics(run_dir: str | Path, row: dict) -> None:
    """One iteration's row, appended as a line of <run_dir>/online_metrics.jsonl, stamped with
    the wall-clock time it was written (time_done, Unix seconds: loop time between two rows)."""
    with open(Path(run_dir) / METRICS_FILE, "a") as f:
        f.write(json.dumps({**row, "time_done": time.time()}) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """One row per iteration (the last one written wins, e.g. after a resume)."""
    path = Path(run_dir) / METRICS_FILE
    rows: dict[int, dict] = {}
    if path.exists():
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):  # cut off by a killed driver; that iteration is re-run on resume
                    continue
                raise DataError(f"{path}:{n}: not a JSON object (only the last line may be cut off)") from None
            rows[r["iteration"]] = r
    return [rows[k] for k in sorted(rows)]


def _fmt(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(int(v) if fmt == "{:d}" else v)


def table(rows: list[dict]) -> str:
    """Markdown table of the per-iteration metrics."""
    head = "| " + " | ".join(t for t, _, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---:" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_fmt(r, k, f) for _, k, f in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def judge_total(row: dict, key: str) -> float:
    """A judge figure of an iteration's row, ranking's and the eval's together (0 where absent)."""
    return (row.get(f"judge_{key}") or 0) + (row.get(f"eval_judge_{key}") or 0)


def judge_table(rows: list[dict]) -> str:
    """The judge per iteration: its position consistency, tie and invalid rates on the eval's
    comparisons (both orders, every judge kind), and for a remote judge what it cost
    (ranking and eval together)."""
    remote = any(judge_total(r, "calls") or judge_total(r, "cache_hits") for r in rows)
    head = "| iter | consistency | tie rate | invalid rate |" + (" calls | cache hits | retries | tokens | cost |"
                                                                 if remote else "")
    lines = [head, "|" + "---:|" * head.count(" |")]
    for r in rows:
        cells = [str(r["iteration"])] + [_fmt(r, f"eval_judge_{k}", "{:.3f}")
                                         for k in ("consistency", "tie_rate", "invalid_rate")]
        if remote:
            cells += [f"{judge_total(r, k):.0f}" for k in ("calls", "cache_hits", "retries")]
            cells += [f"{judge_total(r, 'prompt_tokens') + judge_total(r, 'completion_tokens'):.0f}",
                      f"{judge_total(r, 'cost'):.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_table(rows: list[dict]) -> str:
    trained = [r for r in rows if r["iteration"] > 0]
    if not trained:
        return ""
    tot = {k: sum(r.get(f"time_{k}", 0.0) for r in trained) for k in TIME_KEYS}
    grand = sum(tot.values()) or 1.0
    lines = ["| phase | seconds | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.1f} | {v / grand:.0%} |" for k, v in tot.items()]
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [r["iteration"] for r in rows]
    get = lambda k: [r.get(k, float("nan")) for r in rows]  # noqa: E731
    fig, ax = plt.subplots(2, 3, figsize=(14, 7.5))
    panels = [
        (ax[0, 0], "win rate vs starting policy", [("win_rate", "win rate")], 0.5),
        (ax[0, 1], "mean judge score", [("judge_score", "judge score")], None),
        (ax[0, 2], "mean response length (tokens)", [("response_tokens", "tokens")], None),
        (ax[1, 0], "KL(policy || reference), nats", [("kl", "KL")], None),
        (ax[1, 1], "DPO implicit rewards (last pass)", [("reward_accuracy", "accuracy"),
                                                         ("reward_margin", "margin")], None),
    ]
    for a, title, series, hline in panels:
        for key, label in series:
            a.plot(it, get(key), marker="o", label=label)
        if hline is not None:
            a.axhline(hline, color="grey", lw=0.8, ls="--")
        a.set_title(title)
        a.set_xlabel("iteration")
        if len(series) > 1:
            a.legend()
    a = ax[1, 2]
    bottom = [0.0] * len(rows)
    for k in TIME_KEYS:
        vals = [r.get(f"time_{k}", 0.0) for r in rows]
        a.bar(it, vals, bottom=bottom, label=k)
        bottom = [b + v for b, v in zip(bottom, vals)]
    a.set_title("seconds per iteration")
    a.set_xlabel("iteration")
    a.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def write_report(run_dir: str | Path, extra: dict[str, str] | None = None) -> Path:
    """<run_dir>/report/report.md and report/metrics.png; returns the markdown path."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise DataError(f"{run_dir / METRICS_FILE}: no iterations recorded yet")
    out = run_dir / "report"
    png = plot(rows, out / "metrics.png")
    first, last = rows[0], rows[-1]
    lines = ["# raydpo online DPO report", ""]
    lines.append(f"Run: `{run_dir}`. Iteration 0 is the starting (SFT) policy against its own fixed samples: "
                 f"the noise floor of the win rate.")
    lines += ["", "## Result", ""]
    lines.append(f"- win rate against the starting policy: {_fmt(first, 'win_rate', '{:.3f}')} -> "
                 f"**{_fmt(last, 'win_rate', '{:.3f}')}** after iteration {last['iteration']}")
    lines.append(f"- mean judge score: {_fmt(first, 'judge_score', '{:.3f}')} -> {_fmt(last, 'judge_score', '{:.3f}')}")
    lines.append(f"- judged pairs stored: {sum(r.get('pairs', 0) for r in rows)}")
    if any(judge_total(r, "calls") or judge_total(r, "cache_hits") for r in rows):
        lines.append(f"- judge calls (retries not counted): {sum(judge_total(r, 'calls') for r in rows):.0f}, "
                     f"{sum(judge_total(r, 'cache_hits') for r in rows):.0f} answered from the cache, "
                     f"cost {sum(judge_total(r, 'cost') for r in rows):.4f}")
    for k, v in (extra or {}).items():
        lines.append(f"- {k}: {v}")
    lines += ["", "## Per iteration", "", table(rows), "", "## Where the time went (iterations >= 1)", "",
              time_table(rows), "", "## The judge", "", judge_table(rows), "", f"![metrics]({png.name})", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines))
    return md
