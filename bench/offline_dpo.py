"""Offline DPO throughput: raydpo (Ray Train) vs trl.DPOTrainer, in one run.

    python bench/offline_dpo.py [--pairs 512] [--batch 16] [--hidden 512] [--layers 8]

Same ~25M-parameter Llama (random init), same 512 style-task pairs, same batch
size, no truncation, one epoch, AdamW, both on all CPU cores of this machine.

* TRL: `DPOTrainer.train()` with its live reference model (its default).
* raydpo: everything from the raw JSONL on: validation and tokenization on Ray
  Data, the reference log-probs precomputed once by Ray Data batch inference,
  then `fit()` on one Ray Train worker with both CPUs, length-bucketed batches.
  Ray start-up (a long-running cluster has it up already) is excluded; Ray
  Train's per-fit start-up is *included* and shown separately.

FLOPs: a policy training token costs ~6N, a reference forward token ~2N, so
both sides do 8N per token; model FLOP utilisation (MFU) is that over the
fp32 matmul peak of this machine, measured here with torch.matmul.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import matmul_peak_flops


def count_tokens(rows, tok) -> int:
    n = 0
    for r in rows:
        p = len(tok(r["prompt"]).input_ids)
        n += 2 * p + len(tok(r["chosen"]).input_ids) + len(tok(r["rejected"]).input_ids) + 2  # + EOS each
    return n


def run_trl(model_dir: str, rows: list[dict], batch: int, lr: float) -> tuple[float, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    t0 = time.perf_counter()
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, learning_rate=lr,
                     num_train_epochs=1, report_to="none", save_strategy="no", logging_strategy="no",
                     use_cpu=True, max_length=None, beta=0.1, lr_scheduler_type="constant",
                     dataloader_num_workers=0, seed=0)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir),
                         ref_model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    t1 = time.perf_counter()
    trainer.train()
    return t1 - t0, time.perf_counter() - t1


def run_raydpo(model_dir: str, data: str, run_dir: str, batch: int, lr: float) -> dict[str, float]:
    from transformers import AutoTokenizer

    from raydpo.config import load_config
    from raydpo.data.pipeline import read_pairs, tokenize
    from raydpo.train.trainer import fit, make_spec, precompute_reference

    cfg = load_config(None, [f"run_dir={run_dir}", f"trainer.batch_size={batch}", f"trainer.micro_batch_size={batch}",
                             f"trainer.lr={lr}", "trainer.epochs=1", "trainer.max_steps=0", "cluster.trainer.count=1",
                             f"cluster.trainer.cpus={os.cpu_count()}", "data.max_prompt_length=255", "data.max_length=256"])
    pad = AutoTokenizer.from_pretrained(model_dir).pad_token_id
    t0 = time.perf_counter()
    good, _ = read_pairs(data)
    ds = tokenize(good, model_dir, 255, 256).materialize()
    t1 = time.perf_counter()
    ds = precompute_reference(ds, model_dir, pad, concurrency=1, batch_size=64, cpus=os.cpu_count()).materialize()
    t2 = time.perf_counter()
    fit(make_spec(cfg, "dpo", model_dir, run_dir), ds, cfg, "bench", pad, precomputed_reference=True, resume=False)
    t3 = time.perf_counter()
    steps = [json.loads(l) for l in open(Path(run_dir) / "metrics.jsonl")]
    step_time = sum(s["dpo/tokens"] / s["dpo/tokens_per_s"] for s in steps)
    return {"data": t1 - t0, "reference": t2 - t1, "fit": t3 - t2, "steps": step_time, "total": t3 - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()

    import ray
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydpo.config import TinyModelConfig
    from raydpo.tasks import style
    from raydpo.tiny_model import build_tiny_model, count_parameters

    work = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    shape = TinyModelConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                            num_key_value_heads=args.hidden // 64, intermediate_size=int(args.hidden * 2.75))
    model_dir = str(build_tiny_model(style.corpus(), work / "model", shape))
    n_params = count_parameters(AutoModelForCausalLM.from_pretrained(model_dir))
    rows = style.preference_records(style.split_prompts()[0], args.pairs, seed=0)
    (work / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tokens = count_tokens(rows, AutoTokenizer.from_pretrained(model_dir))
    peak = matmul_peak_flops()
    flops = 8 * n_params * tokens  # 6N policy train + 2N reference forward, per token

    print(f"model {n_params / 1e6:.1f}M params, {args.pairs} pairs, {tokens} tokens, batch {args.batch}, "
          f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    trl_setup, trl_train = run_trl(model_dir, rows, args.batch, args.lr)
    from raydpo.runner import LOCAL_RAY_RUNTIME_ENV

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env=LOCAL_RAY_RUNTIME_ENV)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ours = run_raydpo(model_dir, str(work / "pairs.jsonl"), str(work / "run"), args.batch, args.lr)
    ray.shutdown()

    def line(name, secs):
        return (f"{name:<34} {secs:7.1f} s  {args.pairs / secs:6.1f} pairs/s  {tokens / secs:7.0f} tok/s  "
                f"MFU {flops / secs / peak:5.1%}")

    print(line("TRL DPOTrainer.train()", trl_train))
    print(line("raydpo total (data+ref+fit)", ours["total"]))
    print(line("raydpo training steps only", ours["steps"] + ours["reference"]))
    print(f"\nwhere raydpo's time goes: data {ours['data']:.1f} s, reference precompute {ours['reference']:.1f} s, "
          f"fit {ours['fit']:.1f} s of which steps {ours['steps']:.1f} s and Ray Train start-up/checkpoint "
          f"{ours['fit'] - ours['steps']:.1f} s; TRL set-up (tokenize) {trl_setup:.1f} s not counted")
    print(f"RESULT params={n_params} pairs={args.pairs} trl_pairs_per_s={args.pairs / trl_train:.2f} "
          f"raydpo_pairs_per_s={args.pairs / ours['total']:.2f} ratio={trl_train / ours['total']:.2f} "
          f"steady_ratio={trl_train / (ours['steps'] + ours['reference']):.2f} "
          f"mfu_trl={flops / trl_train / peak:.3f} mfu_raydpo={flops / ours['total'] / peak:.3f}")


if __name__ == "__main__":
    main()
