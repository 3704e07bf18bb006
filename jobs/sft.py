"""SFT stage on Ray Train: supervised fine-tuning on demonstrations.

    python jobs/sft.py [--config FILE] [key=value ...]
    ray job submit --working-dir . -- python jobs/sft.py data.train_path=/shared/sft.jsonl model.path=/shared/base

data.train_path: prompt/completion records, or preference pairs (trained on the
chosen responses). Without it, the built-in style task's mixed-quality
demonstrations (the same ones the online demo starts from) are used, on the tiny
model unless model.path is given. Writes a Hugging Face checkpoint (safetensors)
under <run_dir>/ray_train/sft/ and prints where. The online loop runs this same stage.
"""

import sys
from pathlib import Path

from raydpo.job import base_model, print_table, run_job, stage_rows


def main(cfg, args) -> int:
    from transformers import AutoTokenizer

    from raydpo.cluster import init_ray
    from raydpo.train.staged import sft_stage

    model = base_model(cfg)
    init_ray(cfg)
    ckpt = sft_stage(cfg, model, Path(cfg.run_dir), AutoTokenizer.from_pretrained(model).pad_token_id)
    print_table("SFT done", stage_rows(cfg.run_dir, "sft/") + [("checkpoint", str(ckpt))], cfg.run_dir)


if __name__ == "__main__":
    sys.exit(run_job(main, __doc__))
