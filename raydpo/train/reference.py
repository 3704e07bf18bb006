"""Reference log-probs computed once, by Ray Data batch inference, and cached as Parquet
(trainer.reference_logps=precomputed): training then skips the reference forward."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import ray
import ray.data
import torch

from raydpo.data.collate import layout
from raydpo.data.pipeline import ArrowTokenizer, ordered
from raydpo.train.step import frozen_logps, precision


class _ReferenceScorer:
    """Ray Data callable class: the frozen reference model on a CPU worker."""

    def __init__(self, model_path: str, pad_id: int, trust_remote_code: bool, num_threads: int,
                 shared_prefix: bool, micro_batch_size: int, tokenize: tuple[int, int] | None = None,
                 bf16: bool = False):
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(num_threads)  # Ray leaves torch at 1 thread even with more CPUs reserved
        torch.set_grad_enabled(False)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                          trust_remote_code=trust_remote_code).eval()
        self.pad_id = pad_id
        self.layout = layout(shared_prefix)
        self.micro_batch_size = micro_batch_size
        self.bf16 = bf16
        # text rows in: tokenized here first, with the same `ArrowTokenizer` as `tokenize()`
        self.tokenizer = ArrowTokenizer(model_path, *tokenize, trust_remote_code) if tokenize else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.tokenizer is not None:
            batch = self.tokenizer(batch)
        cols = {k: batch.column(k).to_pylist() for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        n = batch.num_rows
        # forward passes over rows of similar length (less padding), results put back in row order
        order = sorted(range(n), key=lambda i: self.layout.length(cols, i))
        chosen, rejected = [0.0] * n, [0.0] * n
        for s in range(0, n, self.micro_batch_size):
            idx = order[s:s + self.micro_batch_size]
            part = {k: [v[i] for i in idx] for k, v in cols.items()}
            with precision(self.bf16, "cpu"):  # the policy's precision: what the live reference would give
                rc, rr = frozen_logps(self.model, self.layout.collate(part, self.pad_id))
            for i, c, r in zip(idx, rc.tolist(), rr.tolist()):
                chosen[i], rejected[i] = c, r
        return batch.append_column("reference_chosen_logps", pa.array(chosen, pa.float32())).append_column(
            "reference_rejected_logps", pa.array(rejected, pa.float32()))


def precompute_reference(ds: ray.data.Dataset, model_path: str, pad_id: int, concurrency: int = 1,
                         batch_size: int = 256, trust_remote_code: bool = False, cpus: float = 1,
                         shared_prefix: bool = True, micro_batch_size: int = 64,
                         tokenize: tuple[int, int] | None = None, bf16: bool = False) -> ray.data.Dataset:
    """Add reference_chosen_logps / reference_rejected_logps columns, computed once
    by Ray Data batch inference, so that training (and later epochs and runs, if
    the result is written next to the pairs) skips the reference forward.

    Each Ray Data batch of `batch_size` rows is sorted by length and run in forward
    passes of `micro_batch_size` pairs, in the shared-prefix layout unless told not to.
    No gradients are kept, so the forward batch can be larger than training's: bigger
    matmuls run closer to the machine's peak; the log-probs do not depend on it.

    `tokenize=(max_prompt_length, max_length)`: `ds` holds validated text rows
    (`read_pairs`), and the scorer tokenizes each batch itself, exactly as
    `raydpo.data.pipeline.tokenize` would (same `ArrowTokenizer`, the model's
    tokenizer), before scoring it. One Ray Data stage instead of two: no second
    execution, no materialized intermediate, and the scorer's start-up (imports,
    model load) is not paid after tokenization has finished; `bench/reference_pass.py`
    measures it against tokenize-then-score (the same log-probs).
    """
    ordered()
    return ds.map_batches(_ReferenceScorer, fn_constructor_args=(model_path, pad_id, trust_remote_code, max(1, int(cpus)),
                                                                 shared_prefix, micro_batch_size, tokenize, bf16),
                          batch_size=batch_size, batch_format="pyarrow",
                          compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=cpus)



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


def reference_dataset(cfg, ds, model: Path, pad_id: int):
    """`ds` (validated text rows) with the reference log-prob columns, from the cache under
    <run_dir>/reference_cache/<key> or computed there now."""
    from raydpo.data.pipeline import cached_dataset, print_truncation

    bf16 = cfg.model.dtype == "bfloat16"  # as make_spec: the policy's forward precision
    key = reference_cache_key(Path(model).resolve(), Path(cfg.data.train_path).resolve(), cfg.data.max_prompt_length,
                              cfg.data.max_length, cfg.data.format, cfg.trainer.shared_prefix, bf16)
    cache = Path(cfg.run_dir) / "reference_cache" / key
    cache.parent.mkdir(parents=True, exist_ok=True)
    ds, hit = cached_dataset(cache, lambda: precompute_reference(
        ds, str(model), pad_id, cpus=cfg.cluster.trainer.cpus, shared_prefix=cfg.trainer.shared_prefix,
        trust_remote_code=cfg.model.trust_remote_code, bf16=bf16,
        tokenize=(cfg.data.max_prompt_length, cfg.data.max_length)))
    if not hit:
        print_truncation(ds)
    print(f"reference log-probs: {'cached' if hit else 'computed and cached'} at {cache}")
    return ds
