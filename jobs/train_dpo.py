"""Offline DPO on a preference file, on Ray Train.

    python jobs/train_dpo.py data.train_path=pairs.jsonl [model.path=DIR] [data.eval_path=held_out.jsonl] [key=value ...]
    ray job submit --working-dir . -- python jobs/train_dpo.py --config my.yaml

Pairs are validated and tokenized on Ray Data; with trainer.reference=precomputed
the reference log-probs are computed once by Ray Data batch inference and cached
as Parquet under <run_dir>/reference_cache/, so later epochs and later runs on
the same data and model skip the reference forward. Ends with a table of the
final metrics and, with data.eval_path, the held-out preference accuracy.
"""

import sys
from pathlib import Path

from raydpo.config import ConfigError, require
from raydpo.data.formats import DataError, list_files
from raydpo.runner import (base_model, init_ray, job_config, last_metrics, print_table, print_truncation,
                           cached_dataset, read_tokenized, read_validated,
                           reference_cache_key)


def main(argv=None) -> int:
    cfg = job_config(__doc__, argv)
    from raydpo.train.step import LossSettings

    precomputed = cfg.trainer.reference == "precomputed" and LossSettings(cfg.trainer.loss).needs_reference
    bf16 = cfg.model.dtype == "bfloat16"  # as make_spec: the policy's forward precision
    try:
        require(cfg, "data.train_path", by="jobs/train_dpo.py")
        for path in (cfg.data.train_path, cfg.data.eval_path):  # a missing file fails in seconds, before Ray starts
            if path:
                list_files(path)
        model = base_model(cfg)
        init_ray(cfg)
        # precomputed reference: validated text rows go straight to the reference pass,
        # which tokenizes them itself (one Ray Data stage; see precompute_reference)
        ds = read_validated(cfg, cfg.data.train_path) if precomputed else read_tokenized(cfg, cfg.data.train_path, model)
    except (ConfigError, DataError) as e:  # named, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydpo.train.trainer import fit, make_spec, precompute_reference

    tok = AutoTokenizer.from_pretrained(model)
    if precomputed:
        key = reference_cache_key(Path(model).resolve(), Path(cfg.data.train_path).resolve(),
                                  cfg.data.max_prompt_length, cfg.data.max_length, cfg.data.format,
                                  cfg.trainer.shared_prefix, bf16)
        cache = Path(cfg.run_dir) / "reference_cache" / key
        cache.parent.mkdir(parents=True, exist_ok=True)
        ds, hit = cached_dataset(cache, lambda: precompute_reference(
            ds, str(model), tok.pad_token_id, cpus=cfg.cluster.trainer.cpus, shared_prefix=cfg.trainer.shared_prefix,
            trust_remote_code=cfg.model.trust_remote_code, bf16=bf16,
            tokenize=(cfg.data.max_prompt_length, cfg.data.max_length)))
        if not hit:
            print_truncation(ds)
        print(f"reference log-probs: {'cached' if hit else 'computed and cached'} at {cache}")
    ckpt = fit(make_spec(cfg, "dpo", str(model), cfg.run_dir), ds, cfg, "dpo", tok.pad_token_id,
               precomputed_reference=precomputed)
    m = last_metrics(cfg.run_dir, "dpo/")
    rows = [("steps", str(m.get("step"))), ("final loss", f"{m.get('loss', float('nan')):.4f}"),
            ("reward accuracy (last batch)", f"{m.get('rewards/accuracies', float('nan')):.3f}"),
            ("reward margin (last batch)", f"{m.get('rewards/margins', float('nan')):.4f}")]
    if cfg.data.eval_path:
        from raydpo.data.formats import validate_paths
        from raydpo.evaluate import preference_accuracy

        pairs, report = validate_paths([cfg.data.eval_path], cfg.data.format)
        text = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs if not p.is_chat]
        skipped = []  # said in the table, never silent
        if report.bad:
            skipped.append(f"{sum(report.bad.values())} bad")
        if len(text) < len(pairs):  # evaluate.py scores text pairs only so far
            skipped.append(f"{len(pairs) - len(text)} chat pairs")
        label = f"held-out preference accuracy ({len(text)} pairs" + (f"; skipped {', '.join(skipped)})" if skipped else ")")
        if text:
            acc = preference_accuracy(AutoModelForCausalLM.from_pretrained(ckpt), AutoModelForCausalLM.from_pretrained(model),
                                      tok, text, max_prompt_length=cfg.data.max_prompt_length, max_length=cfg.data.max_length)
            rows.append((label, f"{acc:.3f}"))
        else:
            rows.append((label, "n/a"))
    rows.append(("checkpoint", str(ckpt)))
    print_table("DPO done", rows, cfg.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
