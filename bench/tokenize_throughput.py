"""Throughput of validate + tokenize: Ray Data (CPU workers) vs a single-process loop.

    python bench/tokenize_throughput.py [--records 60000] [--files 8] [--workers 2]

Both sides do the same work on the same files: parse and validate every JSONL
record, render chat pairs with the template, tokenize with truncation. The
single-process baseline reads the files and calls `tokenize_batch` in batches
of 256 (the same batch size Ray Data uses); Ray Data runs `read_pairs` +
`tokenize` with `--workers` tokenizer actors and materializes the result.
Ray start-up is excluded from both timings (a running job has Ray up already);
tokenizer actor start-up is included in Ray's time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

from common import start_local_ray
from raydpo.data.formats import validate_paths
from raydpo.data.tokenize import tokenize_batch
from raydpo.tasks import style
from raydpo.tiny_model import build_tiny_model


def write_records(folder: str, n: int, files: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    train, _ = style.split_prompts()
    per = n // files
    for f in range(files):
        with open(os.path.join(folder, f"part-{f}.jsonl"), "w") as fh:
            for i in range(per):
                p = rng.choice(train)
                a, b = style.demonstration(p, rng), style.demonstration(p, rng)
                if a == b:
                    b = b + " please"
                if i % 2:  # half conversational, so chat rendering is part of the work
                    rec = {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": a}],
                           "rejected": [{"role": "assistant", "content": b}]}
                else:
                    rec = {"prompt": p, "chosen": a, "rejected": b}
                fh.write(json.dumps(rec) + "\n")


def baseline(folder: str, tokenizer, batch: int = 256) -> tuple[float, int]:
    t = time.perf_counter()
    pairs, _ = validate_paths([folder])
    n = 0
    for s in range(0, len(pairs), batch):
        chunk = pairs[s : s + batch]
        cols = {k: [getattr(p, k) for p in chunk] for k in ("prompt", "chosen", "rejected", "is_chat", "tools")}
        n += len(tokenize_batch(cols, tokenizer, 64, 128)["prompt_ids"])
    return time.perf_counter() - t, n


def ray_data(folder: str, model_dir: str, workers: int) -> tuple[float, int]:
    from raydpo.data.pipeline import read_pairs, tokenize

    t = time.perf_counter()
    good, _ = read_pairs(folder)
    n = tokenize(good, model_dir, 64, 128, concurrency=workers).materialize().count()
    return time.perf_counter() - t, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=60000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    import ray
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        data, model = os.path.join(tmp, "data"), os.path.join(tmp, "model")
        os.makedirs(data)
        write_records(data, args.records, args.files)
        build_tiny_model(style.corpus(), model)
        tok = AutoTokenizer.from_pretrained(model)

        start_local_ray()
        ray_data(data, model, args.workers)  # warm-up: worker processes, imports
        t_ray, n_ray = ray_data(data, model, args.workers)
        t_base, n_base = baseline(data, tok)
        ray.shutdown()
    assert n_ray == n_base, (n_ray, n_base)
    print(f"records             {n_base}")
    print(f"single process      {t_base:7.2f} s  {n_base / t_base:9.0f} records/s")
    print(f"Ray Data ({args.workers} workers)  {t_ray:7.2f} s  {n_ray / t_ray:9.0f} records/s")
    print(f"RESULT records={n_base} baseline_rps={n_base / t_base:.0f} ray_rps={n_ray / t_ray:.0f} "
          f"ratio={t_base / t_ray:.2f}")


if __name__ == "__main__":
    main()
