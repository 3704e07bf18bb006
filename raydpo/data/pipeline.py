"""Ray Data glue: read and validate files in parallel, tokenize on CPU workers, cache
a computed dataset. The record logic lives in the pure modules beside this one;
this file only schedules it.
"""

from __future__ import annotations

import functools
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import ray
import ray.data

from raydpo.data.formats import (
    BadRecord,
    ValidationReport,
    list_files,
    normalize,
    iter_file,
    reason_class,
    _Bad,
)
from raydpo.data.tokenize import TOKEN_COLUMNS, tokenize_batch
from raydpo.errors import DataError


def ordered() -> None:
    """Make Ray Data keep row order (this process's DataContext). raydpo wants the
    same rows in the same order on every run: resume and equivalence depend on it."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True


_EMPTY = {"prompt": "", "chosen": "", "rejected": "", "is_chat": False, "tools": ""}


def _row(rec) -> dict[str, Any]:
    if isinstance(rec, BadRecord):
        return {**_EMPTY, "source": rec.source, "line": rec.line, "error": rec.reason}
    return {**asdict(rec), "error": ""}


def _parse_file(row: dict, fmt: str) -> list[dict]:
    return [_row(r) for r in iter_file(row["bytes"], row["path"], fmt)]


def _normalize_row(rec: dict, fmt: str) -> dict:
    """For a Ray Dataset of raw records: rows have no file line, so the error
    names the record by its `id` field when it has one (else -1)."""
    ident = rec.get("id", -1)
    try:
        return _row(normalize(rec, fmt, "<dataset>", ident))
    except _Bad as e:
        return _row(BadRecord("<dataset>", ident, str(e)))


def read_pairs(source: str | list[str] | ray.data.Dataset, fmt: str = "auto", strict: bool = False
               ) -> tuple[ray.data.Dataset, ValidationReport]:
    """Validate preference records on Ray Data workers.

    Note for training: Ray Train splits a dataset into equal shards per worker
    (DDP needs equal step counts), so up to num_workers - 1 rows per epoch are
    left out of an epoch; they are not lost from the data set.

    `source`: a JSONL/Parquet file or folder, a list of them, or a Ray Dataset
    of raw records. Returns the good records (normalised columns) and a report
    counting the bad ones by reason, with the first few as examples. With
    `strict`, any bad record raises DataError naming the first one.
    """
    ordered()
    if isinstance(source, ray.data.Dataset):
        rows = source.map(_normalize_row, fn_kwargs={"fmt": fmt})
    else:
        paths = [source] if isinstance(source, str) else list(source)
        files = [f for p in paths for f in list_files(p)]
        raw = ray.data.read_binary_files(files, include_paths=True)
        rows = raw.flat_map(_parse_file, fn_kwargs={"fmt": fmt})
    rows = rows.materialize()  # parsed once; counted and filtered below without re-reading
    bad_rows = rows.filter(expr="error != ''")
    report = ValidationReport()
    report.good = rows.count()
    n_bad = bad_rows.count()
    report.good -= n_bad
    if n_bad:
        examples = sorted(bad_rows.take(report.max_examples * 5), key=lambda r: (r["source"], r["line"]))
        if strict:
            r = examples[0]
            raise DataError(f"strict mode: bad record at {r['source']}:{r['line']}: {r['error']}")
        # exact counts by reason class, computed on the workers
        by_reason = bad_rows.map(lambda r: {"reason": reason_class(r["error"])}).groupby("reason").count()
        for r in by_reason.take_all():
            report.bad[r["reason"]] = r["count()"]
        report.examples = [BadRecord(r["source"], r["line"], r["error"]) for r in examples[: report.max_examples]]
    # Materialized, so that later stages need no CPU for upstream tasks: an
    # actor pool that takes every CPU (e.g. tokenize with concurrency = #CPUs)
    # would otherwise deadlock waiting for this filter to be scheduled.
    good = rows.filter(expr="error == ''").drop_columns(["error"]).materialize()
    return good, report


class ArrowTokenizer:
    """Ray Data callable class (Arrow batch in, Arrow batch out): loads the tokenizer
    once per worker. Also used inside the reference scorer (`precompute_reference`)."""

    def __init__(self, tokenizer_path: str, max_prompt_length: int, max_length: int, trust_remote_code: bool):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
        self.max_prompt_length, self.max_length = max_prompt_length, max_length

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Arrow in, Arrow out with list<int32> columns: ragged numpy object arrays
        # would become Ray's variable-shaped tensor extension, about 2x slower here.
        cols = {name: batch.column(name).to_pylist() for name in batch.column_names}
        out = tokenize_batch(cols, self.tokenizer, self.max_prompt_length, self.max_length)
        ids = pa.list_(pa.int32())
        return pa.table({k: pa.array(v, type=ids) if k in TOKEN_COLUMNS else pa.array(v) for k, v in out.items()})


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(tokenizer_path: str, max_prompt_length: int, max_length: int, trust_remote_code: bool):
    return ArrowTokenizer(tokenizer_path, max_prompt_length, max_length, trust_remote_code)


def _tokenize_task(batch: pa.Table, tokenizer_path: str, max_prompt_length: int, max_length: int,
                   trust_remote_code: bool) -> pa.Table:
    # Ray reuses worker processes for tasks, so the tokenizer loads once per process.
    return _cached_tokenizer(tokenizer_path, max_prompt_length, max_length, trust_remote_code)(batch)


def tokenize(ds: ray.data.Dataset, tokenizer_path: str, max_prompt_length: int, max_length: int,
             concurrency: int = 1, batch_size: int = 256, trust_remote_code: bool = False,
             tasks: bool = False) -> ray.data.Dataset:
    """Add prompt_ids/chosen_ids/rejected_ids (+ truncation flags) on CPU workers.

    Default: an actor pool of `concurrency` tokenizer actors.
    `tasks=True` (what the jobs use): plain tasks, which Ray Data spreads over
    every free CPU, with the tokenizer loaded once per worker process. No actor
    start-up per call (faster on the offline bench, `bench/tokenize_throughput.py`),
    and no actor holding a CPU that the read
    tasks feeding it are waiting for when other long-lived roles (trainer,
    samplers) already hold the rest of the cluster.
    """
    ordered()
    if tasks:
        return ds.map_batches(_tokenize_task, fn_args=(tokenizer_path, max_prompt_length, max_length, trust_remote_code),
                              batch_size=batch_size, batch_format="pyarrow", num_cpus=1)
    return ds.map_batches(
        ArrowTokenizer,
        fn_constructor_args=(tokenizer_path, max_prompt_length, max_length, trust_remote_code),
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=1,
    )


def truncation_counts(ds: ray.data.Dataset) -> dict[str, int]:
    """How many tokenized records had their prompt / a response cut (runs `ds` if not materialized).

    One small task per block, next to the block, instead of a Ray Data aggregate, which
    costs seconds of planning and scheduling for two sums (`bench/reference_pass.py`).
    """
    parts = ray.get([_truncated_in_block.remote(ref) for ref in ds.to_arrow_refs()])
    return {"prompt_truncated": sum(p for p, _ in parts), "response_truncated": sum(r for _, r in parts)}


@ray.remote(num_cpus=0)
def _truncated_in_block(block: pa.Table) -> tuple[int, int]:
    import pyarrow.compute as pc

    return tuple(int(pc.sum(block[c]).as_py() or 0) for c in ("prompt_truncated", "response_truncated"))


# ------------------------------------------------------------------ what the jobs read


def read_validated(cfg, source):
    """Validate on Ray Data (the report is printed); the good records, not yet tokenized."""
    good, report = read_pairs(source, cfg.data.format, cfg.data.strict)
    print(report.summary())
    for bad in report.examples[:5]:
        print(f"  e.g. {bad}")
    if report.good == 0:
        raise DataError(f"data.train_path: no usable records in {source}")
    return good


def print_truncation(ds) -> None:
    cut = truncation_counts(ds)
    print(f"truncated: {cut['prompt_truncated']} prompts (end kept), {cut['response_truncated']} pairs' responses (cut)")


def read_tokenized(cfg, source, tokenizer_path):
    """Validate (report printed) and tokenize on Ray Data; a materialized dataset."""
    ds = tokenize(read_validated(cfg, source), str(tokenizer_path), cfg.data.max_prompt_length, cfg.data.max_length,
                  trust_remote_code=cfg.model.trust_remote_code, tasks=True).materialize()
    print_truncation(ds)
    return ds


def cached_dataset(cache, compute):
    """The Parquet dataset at `cache`, or `compute()` written there atomically: into a
    temporary sibling folder first, renamed into place once complete. A killed write leaves
    only the temporary folder (removed next time), never a half-written cache that a rerun
    would add to. Returns (dataset, whether it came from the cache)."""
    import os
    import shutil

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

