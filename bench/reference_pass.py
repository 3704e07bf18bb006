"""Tokenize + reference pass: one Ray Data stage vs two, in one Ray session.

    python bench/reference_pass.py [--pairs 1024] [--rounds 2] [--hidden 512] [--layers 8]

Baseline (two stages, what jobs/train_dpo.py did before): `tokenize(...)` with
Ray Data tasks, materialized, then `precompute_reference(...)` on the tokens.
raydpo now (one stage): `precompute_reference(..., tokenize=...)` on the
validated text rows; the scorer tokenizes each batch before scoring it.
Both start from the same validated rows (`read_pairs`, materialized once,
not timed) and end with the same materialized columns, which are compared.
The two are alternated for `--rounds` rounds, so a warm or cold Ray does not
favour one; the medians are compared. Also timed: the truncation counts the
jobs print, with `ds.sum` per column (what they did before) and with
`truncation_counts` (now).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import llama_shape, start_local_ray


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()

    import ray
    from transformers import AutoTokenizer

    from raydpo.data.pipeline import read_pairs, tokenize, truncation_counts
    from raydpo.tasks import style
    from raydpo.tiny_model import build_tiny_model
    from raydpo.train.reference import precompute_reference

    work = Path(tempfile.mkdtemp(prefix="bench_ref_"))
    model = str(build_tiny_model(style.corpus(), work / "model", llama_shape(args.hidden, args.layers)))
    rows = style.preference_records(style.split_prompts()[0], args.pairs, seed=0)
    (work / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pad = AutoTokenizer.from_pretrained(model).pad_token_id
    cpus = os.cpu_count()
    start_local_ray(cpus)
    good, _ = read_pairs(str(work / "pairs.jsonl"))

    def two_stages():
        tokens = tokenize(good, model, 255, 256, tasks=True).materialize()
        return precompute_reference(tokens, model, pad, cpus=cpus).materialize()

    def one_stage():
        return precompute_reference(good, model, pad, cpus=cpus, tokenize=(255, 256)).materialize()

    times = {"two": [], "one": [], "sums": [], "counts": []}
    results = {}
    for r in range(args.rounds):
        for name, fn in (("two", two_stages), ("one", one_stage)) if r % 2 == 0 else (("one", one_stage), ("two", two_stages)):
            t = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t)
            print(f"round {r}: {name} stage(s) {times[name][-1]:.1f} s", flush=True)
        t = time.perf_counter()
        sums = (results["one"].sum("prompt_truncated"), results["one"].sum("response_truncated"))
        times["sums"].append(time.perf_counter() - t)
        t = time.perf_counter()
        counts = truncation_counts(results["one"])
        times["counts"].append(time.perf_counter() - t)
        assert (counts["prompt_truncated"], counts["response_truncated"]) == tuple(int(s or 0) for s in sums)

    one = sorted(results["one"].take_all(), key=lambda x: x["prompt"] + x["chosen"])
    two = sorted(results["two"].take_all(), key=lambda x: x["prompt"] + x["chosen"])
    diff = max(abs(a[k] - b[k]) for a, b in zip(one, two) for k in ("reference_chosen_logps", "reference_rejected_logps"))
    assert len(one) == len(two) == args.pairs and diff < 1e-4, diff
    ray.shutdown()

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{'':<44} {'median':>8}  runs")
    print(f"{'tokenize, then reference pass (two stages)':<44} {med['two']:7.1f}s  "
          + " ".join(f"{x:.1f}" for x in times["two"]))
    print(f"{'reference pass that tokenizes (one stage)':<44} {med['one']:7.1f}s  "
          + " ".join(f"{x:.1f}" for x in times["one"]))
    print(f"{'truncation counts: ds.sum per column':<44} {med['sums']:7.2f}s")
    print(f"{'truncation counts: truncation_counts()':<44} {med['counts']:7.2f}s")
    print(f"(same log-probs: largest difference {diff:.1e})")
    print(f"RESULT pairs={args.pairs} rounds={args.rounds} two_stage_s={med['two']:.1f} one_stage_s={med['one']:.1f} "
          f"ratio={med['two'] / med['one']:.2f} sums_s={med['sums']:.2f} counts_s={med['counts']:.3f} "
          f"counts_ratio={med['sums'] / max(med['counts'], 1e-3):.0f}")


if __name__ == "__main__":
    main()
