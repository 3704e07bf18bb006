"""The preference store: every judged pair, in Parquet, partitioned by iteration.

Layout (hive partitioning, readable by pyarrow, Ray Data, pandas, DuckDB)::

    <root>/iteration=000003/chunk-00000.parquet
    <root>/iteration=000003/chunk-00001.parquet
    <root>/_staging/...            in-flight writes; readers skip "_" folders

Writes are atomic: a chunk is written and fsynced under ``_staging/`` and then
renamed into its partition (``os.replace`` is atomic on one filesystem), so a
crash never leaves a half-written file where readers look. Chunk names are
chosen by the caller and deterministic, so re-writing a chunk after a crash
replaces it instead of adding a duplicate, and ``has_chunk`` lets a resumed
loop skip what is already stored. Every pair also carries a ``pair_id``.
Pure pyarrow: no Ray (the loop hands an iteration's rows to Ray Data with
`ray.data.from_arrow`, see `raydpo.online.training_data`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from raydpo.files import atomic_write


@dataclass(frozen=True)
class StoredPair:
    """One judged pair and where it came from."""

    pair_id: str  # unique and deterministic for the pair (e.g. iteration/prompt/sample ids)
    iteration: int  # online iteration that produced it (0 for offline data)
    policy_version: int  # weights version that sampled both responses
    source: str  # "online", "offline:<file>", ...
    prompt: str
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float
    judge: str  # judge identity and version
    # What the sampler produced, token for token: the trainer trains on these, not on the text.
    # None for pairs that never came from the sampler (they go through the text path).
    prompt_token_ids: tuple[int, ...] | None = None
    chosen_token_ids: tuple[int, ...] | None = None  # EOS last if and only if the sampler stopped on it
    rejected_token_ids: tuple[int, ...] | None = None
    chosen_finish_reason: str | None = None  # "stop" or "length" (cut at max_new_tokens)
    rejected_finish_reason: str | None = None
    chosen_logprobs: tuple[float, ...] | None = None  # the sampler's log-prob of each response token
    rejected_logprobs: tuple[float, ...] | None = None


SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("policy_version", pa.int64()),
        ("source", pa.string()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("chosen_score", pa.float64()),
        ("rejected_score", pa.float64()),
        ("judge", pa.string()),
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("chosen_token_ids", pa.list_(pa.int32())),
        ("rejected_token_ids", pa.list_(pa.int32())),
        ("chosen_finish_reason", pa.string()),
        ("rejected_finish_reason", pa.string()),
        ("chosen_logprobs", pa.list_(pa.float32())),
        ("rejected_logprobs", pa.list_(pa.float32())),
    ]
)  # `iteration` lives in the partition path, not in the file
COUNTS_KEY = "raydpo.pair_counts"
PARTITIONING = pads.partitioning(pa.schema([("iteration", pa.int32())]), flavor="hive")
FULL_SCHEMA = SCHEMA.append(pa.field("iteration", pa.int32()))


class PreferenceStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.staging = self.root / "_staging"

    def chunk_path(self, iteration: int, chunk: int) -> Path:
        return self.root / f"iteration={iteration:06d}" / f"chunk-{chunk:05d}.parquet"

    def has_chunk(self, iteration: int, chunk: int) -> bool:
        return self.chunk_path(iteration, chunk).exists()

    def write_chunk(self, iteration: int, chunk: int, pairs: Sequence[StoredPair], counts: dict | None = None) -> Path:
        """Atomically store `pairs` as chunk `chunk` of `iteration` (replacing it if present).
        `counts` (what the chunk's judging dropped, and why) ride in the file's metadata, so a
        resumed iteration reports the same counts as an uninterrupted one (`chunk_counts`)."""
        for p in pairs:
            if p.iteration != iteration:
                raise ValueError(f"pair {p.pair_id} has iteration {p.iteration}, chunk is for {iteration}")
        cols = {f.name: [getattr(p, f.name) for p in pairs] for f in fields(StoredPair) if f.name != "iteration"}
        schema = SCHEMA if counts is None else SCHEMA.with_metadata({COUNTS_KEY: json.dumps(counts)})
        table = pa.table(cols, schema=schema)
        # staged outside the partitions, so readers never list a dead writer's leftover
        return atomic_write(self.chunk_path(iteration, chunk), lambda f: pq.write_table(table, f),
                            tmp_dir=self.staging, durable=True)

    def chunk_counts(self, iteration: int, chunk: int) -> dict | None:
        """The counts stored with a chunk by write_chunk (None if it has none)."""
        meta = pq.read_schema(self.chunk_path(iteration, chunk)).metadata or {}
        raw = meta.get(COUNTS_KEY.encode())
        return json.loads(raw) if raw else None

    def chunk_files(self, iterations: Sequence[int] | None = None) -> list[Path]:
        """Committed chunk files (of `iterations`, default all), in (iteration, chunk) order."""
        if iterations is None:
            return sorted(self.root.glob("iteration=*/chunk-*.parquet"))
        return sorted(f for i in sorted(set(iterations)) for f in self.root.glob(f"iteration={i:06d}/chunk-*.parquet"))

    def read_table(self, iterations: Sequence[int] | None = None) -> pa.Table:
        """Stored pairs (of `iterations`, default all) with the `iteration` column, or an empty table."""
        files = self.chunk_files(iterations)
        if not files:
            return FULL_SCHEMA.empty_table()
        ds = pads.dataset([str(f) for f in files], schema=FULL_SCHEMA, format="parquet",
                          partitioning=PARTITIONING, partition_base_dir=str(self.root))
        return ds.to_table()

    def read_pairs(self) -> list[StoredPair]:
        tuples = {"prompt_token_ids", "chosen_token_ids", "rejected_token_ids", "chosen_logprobs", "rejected_logprobs"}
        return [StoredPair(**{k: tuple(v) if k in tuples and v is not None else v for k, v in row.items()})
                for row in self.read_table().to_pylist()]

    def count(self) -> int:
        return self.read_table().num_rows

    def clean_staging(self) -> int:
        """Remove leftovers of writers that died; return how many."""
        if not self.staging.exists():
            return 0
        n = 0
        for f in self.staging.iterdir():
            f.unlink()
            n += 1
        return n



# ------------------------------------------------------------------ training rows

TRUNCATED = ("keep", "drop")


@dataclass
class RowCounts:
    """What `training_rows` did with an iteration's stored pairs."""

    pairs: int = 0  # stored pairs looked at
    truncated: int = 0  # pairs with a response the sampler cut at max_new_tokens (kept or dropped)
    truncated_dropped: int = 0  # ... dropped by truncated="drop"
    over_length_dropped: int = 0  # prompt + response longer than max_length: dropped, never re-cut
    rows: int = 0  # training rows out


def training_rows(table: pa.Table, truncated: str = "keep", max_length: int | None = None) -> tuple[pa.Table, RowCounts]:
    """Stored online pairs -> training rows on the sampler's own token ids.

    prompt_ids / chosen_ids / rejected_ids are the stored ids unchanged: a response
    carries EOS if and only if the sampler ended it with EOS. A response the sampler
    cut (finish_reason "length") is a prefix of what the policy would have written:
    ``truncated="keep"`` trains on it as it is (no EOS is made up), ``"drop"`` leaves
    the pair out. A pair longer than `max_length` is dropped, not cut: cutting the
    prompt would train on a context the sampler never saw. Both are counted.
    """
    import pyarrow.compute as pc

    if truncated not in TRUNCATED:
        raise ValueError(f"truncated must be one of {TRUNCATED}, got {truncated!r}")
    ids = ("prompt_token_ids", "chosen_token_ids", "rejected_token_ids")
    missing = [c for c in ids if c not in table.column_names or table.column(c).null_count]
    if missing:  # read_table fills the columns of files written before they existed with nulls
        raise ValueError(f"stored pairs without sampler token ids ({', '.join(missing)}): the store predates "
                         f"token-exact training, or the pairs did not come from the sampler; start a new run_dir")
    counts = RowCounts(pairs=table.num_rows)
    cut = pc.or_(pc.equal(table.column("chosen_finish_reason"), "length"),
                 pc.equal(table.column("rejected_finish_reason"), "length"))
    counts.truncated = int(pc.sum(cut).as_py() or 0)
    keep = pc.invert(cut) if truncated == "drop" else pa.array([True] * table.num_rows, pa.bool_())
    if truncated == "drop":
        counts.truncated_dropped = counts.truncated
    if max_length is not None:
        p = pc.list_value_length(table.column("prompt_token_ids"))
        longest = pc.max_element_wise(pc.list_value_length(table.column("chosen_token_ids")),
                                      pc.list_value_length(table.column("rejected_token_ids")))
        fits = pc.less_equal(pc.add(p, longest), max_length)
        counts.over_length_dropped = int(pc.sum(pc.and_(keep, pc.invert(fits))).as_py() or 0)
        keep = pc.and_(keep, fits)
    rows = table.filter(keep)
    counts.rows = rows.num_rows
    out = pa.table({"pair_id": rows.column("pair_id"), "prompt_ids": rows.column("prompt_token_ids"),
                    "chosen_ids": rows.column("chosen_token_ids"), "rejected_ids": rows.column("rejected_token_ids")})
    return out, counts
