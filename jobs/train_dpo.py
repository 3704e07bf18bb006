"""Offline DPO on a preference file, on Ray Train.

    python jobs/train_dpo.py data.train_path=pairs.jsonl [model.path=DIR] [data.eval_path=held_out.jsonl] [key=value ...]
    ray job submit --working-dir . -- python jobs/train_dpo.py --config my.yaml

Pairs are validated and tokenized on Ray Data; with trainer.reference_logps=precomputed
the reference log-probs are computed once by Ray Data batch inference and cached
as Parquet under <run_dir>/reference_cache/, so later epochs and later runs on
the same data and model skip the reference forward. Ends with a table of the
final metrics and, with data.eval_path, the held-out preference accuracy.
"""

import sys

from raydpo.job import base_model, print_table, run_job, stage_rows


def main(cfg, args) -> int:
    from transformers import AutoTokenizer

    from raydpo.cluster import init_ray
    from raydpo.config_io import require
    from raydpo.data.formats import list_files
    from raydpo.data.pipeline import read_tokenized, read_validated
    from raydpo.losses import LossSettings
    from raydpo.train.evaluate import held_out_row
    from raydpo.train.reference import reference_dataset
    from raydpo.train.spec import make_spec
    from raydpo.train.staged import fit

    precomputed = cfg.trainer.reference_logps == "precomputed" and LossSettings(cfg.trainer.loss).needs_reference
    require(cfg, "data.train_path", by="jobs/train_dpo.py")
    for path in (cfg.data.train_path, cfg.data.eval_path):  # a missing file fails in seconds, before Ray starts
        if path:
            list_files(path)
    model = base_model(cfg)
    init_ray(cfg)
    pad = AutoTokenizer.from_pretrained(model).pad_token_id
    if precomputed:  # validated text rows go straight to the reference pass, which tokenizes them itself
        ds = reference_dataset(cfg, read_validated(cfg, cfg.data.train_path), model, pad)
    else:
        ds = read_tokenized(cfg, cfg.data.train_path, model)
    ckpt = fit(make_spec(cfg, "dpo", str(model), cfg.run_dir), ds, cfg, "dpo", pad, precomputed_reference=precomputed)
    rows = stage_rows(cfg.run_dir, "dpo/", {"reward accuracy (last batch)": "rewards/accuracies",
                                           "reward margin (last batch)": "rewards/margins"})
    if cfg.data.eval_path:
        rows.append(held_out_row(cfg, ckpt, model))
    print_table("DPO done", rows + [("checkpoint", str(ckpt))], cfg.run_dir)


if __name__ == "__main__":
    sys.exit(run_job(main, __doc__))
