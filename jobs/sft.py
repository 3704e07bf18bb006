"""SFT stage on Ray Train: supervised fine-tuning on demonstrations.

    python jobs/sft.py [--config FILE] [key=value ...]
    ray job submit --working-dir . -- python jobs/sft.py data.train_path=/shared/sft.jsonl model.path=/shared/base

data.train_path: prompt/completion records, or preference pairs (trained on the
chosen responses). Without it, the built-in style task's mixed-quality
demonstrations (trainer.sft_steps x trainer.sft_batch_size of them) are used,
on the tiny model unless model.path is given. Writes a Hugging Face checkpoint
(safetensors) under <run_dir>/ray_train/sft/ and prints where.
"""

import json
import sys
from pathlib import Path

from raydpo.config import ConfigError
from raydpo.data.formats import DataError
from raydpo.runner import base_model, init_ray, job_config, last_metrics, print_table, read_tokenized


def main(argv=None) -> int:
    cfg = job_config(__doc__, argv)
    try:
        model = base_model(cfg)
        source = cfg.data.train_path
        if source is None:
            from raydpo.tasks import style

            source = str(Path(cfg.run_dir) / "sft_demonstrations.jsonl")
            with open(source, "w") as f:
                for r in style.sft_records(cfg.trainer.sft_steps * cfg.trainer.sft_batch_size, cfg.seed):
                    f.write(json.dumps(r) + "\n")
        init_ray(cfg)
        ds = read_tokenized(cfg, source, model)
    except (ConfigError, DataError) as e:  # named, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    from raydpo.train.trainer import fit, make_spec

    pad = AutoTokenizer.from_pretrained(model).pad_token_id
    ckpt = fit(make_spec(cfg, "sft", str(model), cfg.run_dir), ds, cfg, "sft", pad)
    m = last_metrics(cfg.run_dir, "sft/")
    print_table("SFT done", [("steps", str(m.get("step"))), ("final loss", f"{m.get('loss', float('nan')):.4f}"),
                             ("checkpoint", str(ckpt))], cfg.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
