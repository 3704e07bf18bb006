"""Train a Bradley-Terry reward model on preference pairs, on Ray Train; serve it as a judge.

    python jobs/train_reward.py data.train_path=pairs.jsonl [data.eval_path=held_out.jsonl] [model.path=DIR]
    ray job submit --working-dir . -- python jobs/train_reward.py --config my.yaml

The same data pipeline (validation + Ray Data tokenization) and trainer machinery
(DDP / DeepSpeed, checkpoints, resume, metrics) as DPO; the model is the policy's
body with a scalar head (AutoModelForSequenceClassification, num_labels=1) and the
loss is -log sigmoid(r_chosen - r_rejected). With no data.train_path it trains on
the built-in style task's synthetic pairs. The checkpoint is an HF folder: serve it
with judge.kind=reward_model judge.model_path=<it> (or the judge app arg
``reward_model``). Ends with held-out pairwise accuracy before and after training.
"""

import json
import sys
from pathlib import Path

from raydpo.config import ConfigError
from raydpo.data.formats import DataError
from raydpo.runner import base_model, init_ray, job_config, last_metrics, print_table, read_tokenized


def pairwise_accuracy(model_path: str, pairs: list[dict], cfg) -> float:
    """Share of pairs where the reward model scores chosen above rejected."""
    from raydpo.serve_judge import RewardModelScorer

    scorer = RewardModelScorer(model_path, cfg.data.max_prompt_length, cfg.data.max_length)
    rc = scorer([(p["prompt"], p["chosen"]) for p in pairs])
    rr = scorer([(p["prompt"], p["rejected"]) for p in pairs])
    return sum(c > r for c, r in zip(rc, rr)) / len(pairs)


def main(argv=None) -> int:
    cfg = job_config(__doc__, argv)
    run_dir = Path(cfg.run_dir)
    try:
        model = base_model(cfg)
        train_path, eval_path = cfg.data.train_path, cfg.data.eval_path
        if train_path is None:  # the style task's synthetic pairs: train and held-out prompts kept apart
            from raydpo.tasks import style

            train_prompts, held_out = style.split_prompts(cfg.seed)
            for name, prompts, n in (("train", train_prompts, 2048), ("eval", held_out, 256)):
                path = run_dir / f"reward_{name}.jsonl"
                path.write_text("".join(json.dumps(r) + "\n" for r in style.preference_records(prompts, n, cfg.seed)))
            train_path, eval_path = str(run_dir / "reward_train.jsonl"), str(run_dir / "reward_eval.jsonl")
        init_ray(cfg)
        ds = read_tokenized(cfg, train_path, model)
    except (ConfigError, DataError) as e:  # named, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    from raydpo.train.trainer import fit, make_spec

    pad = AutoTokenizer.from_pretrained(model).pad_token_id
    ckpt = fit(make_spec(cfg, "reward", str(model), cfg.run_dir), ds, cfg, "reward", pad)
    m = last_metrics(cfg.run_dir, "reward/")
    rows = [("steps", str(m.get("step"))), ("final loss", f"{m.get('loss', float('nan')):.4f}"),
            ("accuracy (last batch)", f"{m.get('accuracy', float('nan')):.3f}")]
    if eval_path:
        from raydpo.data.formats import validate_paths

        pairs, report = validate_paths([eval_path], cfg.data.format)
        text = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs if not p.is_chat]
        skipped = sum(report.bad.values()) + len(pairs) - len(text)
        if text:
            after = pairwise_accuracy(str(ckpt), text, cfg)
            rows.append((f"held-out pairwise accuracy ({len(text)} pairs, {skipped} skipped)", f"{after:.3f}"))
            (run_dir / "reward_eval.json").write_text(json.dumps({"accuracy": after, "pairs": len(text),
                                                                   "skipped": skipped}))
    rows.append(("checkpoint (serve with judge.kind=reward_model)", str(ckpt)))
    print_table("reward model done", rows, cfg.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
