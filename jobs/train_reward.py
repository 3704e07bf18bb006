"""Train a Bradley-Terry reward model on preference pairs, on Ray Train; serve it as a judge.

    python jobs/train_reward.py data.train_path=pairs.jsonl [data.eval_path=held_out.jsonl] [model.path=DIR]
    ray job submit --working-dir . -- python jobs/train_reward.py --config my.yaml

The same data pipeline (validation + Ray Data tokenization) and trainer machinery
(DDP / DeepSpeed, checkpoints, resume, metrics) as DPO; the model is the policy's
body with a scalar head (AutoModelForSequenceClassification, num_labels=1) and the
loss is -log sigmoid(r_chosen - r_rejected). With no data.train_path it trains on
the built-in style task's synthetic pairs. The checkpoint is an HF folder: serve it
with judge.kind=reward_model judge.model_path=<it> (or the judge app arg
``reward_model``). Ends with held-out pairwise accuracy.
"""

import sys
from pathlib import Path

from raydpo.job import base_model, print_table, run_job, stage_rows


def main(cfg, args) -> int:
    from transformers import AutoTokenizer

    from raydpo.cluster import init_ray
    from raydpo.data.pipeline import read_tokenized
    from raydpo.judge.reward_model import held_out_row
    from raydpo.tasks.style import write_reward_data
    from raydpo.train.spec import make_spec
    from raydpo.train.staged import fit

    model = base_model(cfg)
    train_path, eval_path = cfg.data.train_path, cfg.data.eval_path
    if train_path is None:  # the style task's synthetic pairs: train and held-out prompts kept apart
        train_path, eval_path = write_reward_data(Path(cfg.run_dir), cfg.seed)
    init_ray(cfg)
    ds = read_tokenized(cfg, train_path, model)
    pad = AutoTokenizer.from_pretrained(model).pad_token_id
    ckpt = fit(make_spec(cfg, "reward", str(model), cfg.run_dir), ds, cfg, "reward", pad)
    rows = stage_rows(cfg.run_dir, "reward/", {"accuracy (last batch)": "accuracy"})
    if eval_path:
        rows.append(held_out_row(cfg, ckpt, eval_path))
    print_table("reward model done", rows + [("checkpoint (serve with judge.kind=reward_model)", str(ckpt))],
                cfg.run_dir)


if __name__ == "__main__":
    sys.exit(run_job(main, __doc__))
