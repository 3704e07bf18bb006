"""Offline DPO throughput: raydpo (Ray Train) vs trl.DPOTrainer, in one run.

    python bench/offline_dpo.py [--pairs 1024] [--epochs 3] [--batch 16] [--hidden 512] [--layers 8]
                                [--ablation] [--trl-precompute]

Same ~25M-parameter Llama (random init), same style-task pairs, same batch size,
no truncation, same epochs (3 by default: transformers' and so TRL's default
num_train_epochs), AdamW, lr, beta, fp32, no gradient checkpointing, all CPU
cores of this machine, and both end with a saved checkpoint (weights + optimizer
state). Each side is timed from the raw records to that checkpoint:

* TRL: `DPOTrainer(...)` (tokenizes) + `train()` with its live reference model
  (its default) + the end-of-epoch checkpoint. Two TRL 1.16 defaults are
  overridden so that both sides do the same arithmetic: `bf16` (on by default;
  on this CPU it runs the matmuls in bf16 autocast) and `gradient_checkpointing`
  (on by default; it recomputes activations).
* raydpo, as `jobs/train_dpo.py` runs it: validation on Ray Data, then one Ray
  Data batch-inference stage that tokenizes the pairs and precomputes their
  reference log-probs once, then `fit()` on one Ray Train worker with
  both CPUs (length-bucketed batches, prompt + chosen + rejected in one row).
  Ray's own start-up is excluded (a long-running cluster has it up already);
  Ray Train's per-fit start-up and the checkpoint are included.

--ablation repeats raydpo with `trainer.shared_prefix=false` (TRL's two-row
layout): what bucketing + the precomputed reference give on their own.
--trl-precompute adds a TRL run with `precompute_ref_log_probs=True` (TRL's own
option to compute the reference once per run instead of every step).

FLOPs: a policy training token costs ~6N, a reference forward token ~2N. MFU
counts the real (non-pad) tokens each side runs: TRL's two rows per pair hold
2p + c + r tokens, raydpo's one row p + c + r; the fp32 matmul peak is
measured here, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import llama_shape, matmul_peak_flops, start_local_ray


def layout_tokens(rows, tok) -> dict[str, int]:
    """Tokens per layout: real tokens, and what padding to the batch's longest row adds
    is measured by each side itself (TRL: input shapes; raydpo: its metrics)."""
    eos = [tok.eos_token_id]
    two_rows = one_row = 0
    for r in rows:
        p = len(tok(r["prompt"]).input_ids)
        c, j = len(tok(r["chosen"]).input_ids + eos), len(tok(r["rejected"]).input_ids + eos)
        two_rows += 2 * p + c + j
        one_row += p + c + j
    return {"two_rows": two_rows, "one_row": one_row}


def run_trl(model_dir: str, rows: list[dict], batch: int, lr: float, epochs: int,
            precompute: bool = False) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    t0 = time.perf_counter()
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, learning_rate=lr,
                     num_train_epochs=epochs, report_to="none", save_strategy="no", logging_strategy="no",
                     use_cpu=True, max_length=None, beta=0.1, lr_scheduler_type="constant", max_grad_norm=1.0,
                     bf16=False, gradient_checkpointing=False, dataloader_num_workers=0, seed=0,
                     precompute_ref_log_probs=precompute)
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    padded = []
    policy.register_forward_pre_hook(lambda m, a, kw: padded.append(kw["input_ids"].numel()), with_kwargs=True)
    trainer = DPOTrainer(model=policy, ref_model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    t1 = time.perf_counter()
    trainer.train()
    # weights + optimizer + scheduler once at the end, as raydpo's final checkpoint (save_strategy="epoch"
    # would save every epoch); Trainer's own internal save, the one its save strategies call
    trainer._save_checkpoint(trainer.model, trial=None)
    t2 = time.perf_counter()
    assert list(Path(args.output_dir).glob("checkpoint-*/model.safetensors")), "TRL saved no checkpoint"
    return {"setup": t1 - t0, "train": t2 - t1, "total": t2 - t0, "padded_tokens": sum(padded)}


def run_raydpo(model_dir: str, data: str, run_dir: str, batch: int, lr: float, epochs: int,
               shared_prefix: bool) -> dict[str, float]:
    from transformers import AutoTokenizer

    from raydpo.config_io import load_config
    from raydpo.data.pipeline import read_pairs
    from raydpo.train.reference import precompute_reference
    from raydpo.train.spec import make_spec
    from raydpo.train.staged import fit

    cfg = load_config(None, [f"run_dir={run_dir}", f"trainer.batch_size={batch}", f"trainer.micro_batch_size={batch}",
                             f"trainer.lr={lr}", f"trainer.epochs={epochs}", "trainer.max_steps=0", "cluster.trainer.count=1",
                             f"cluster.trainer.cpus={os.cpu_count()}", "data.max_prompt_length=255", "data.max_length=256",
                             f"trainer.shared_prefix={str(shared_prefix).lower()}"])
    pad = AutoTokenizer.from_pretrained(model_dir).pad_token_id
    t0 = time.perf_counter()
    good, _ = read_pairs(data)  # as jobs/train_dpo.py with trainer.reference_logps=precomputed
    t1 = time.perf_counter()
    ds = precompute_reference(good, model_dir, pad, concurrency=1, cpus=os.cpu_count(), shared_prefix=shared_prefix,
                              tokenize=(255, 256)).materialize()
    t2 = time.perf_counter()
    fit(make_spec(cfg, "dpo", model_dir, run_dir), ds, cfg, "bench", pad, precomputed_reference=True, resume=False)
    t3 = time.perf_counter()
    steps = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    step_time = sum(s["dpo/tokens"] / s["dpo/tokens_per_s"] for s in steps)
    return {"data": t1 - t0, "reference": t2 - t1, "fit": t3 - t2, "steps": step_time, "total": t3 - t0,
            "tokens": sum(s["dpo/tokens_padded"] for s in steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--ablation", action="store_true", help="also run raydpo with trainer.shared_prefix=false")
    ap.add_argument("--trl-precompute", action="store_true", help="also run TRL with precompute_ref_log_probs=True")
    args = ap.parse_args()

    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydpo.tasks import style
    from raydpo.tiny_model import build_tiny_model, count_parameters

    torch.set_num_threads(os.cpu_count())
    work = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    model_dir = str(build_tiny_model(style.corpus(), work / "model", llama_shape(args.hidden, args.layers)))
    n_params = count_parameters(AutoModelForCausalLM.from_pretrained(model_dir))
    rows = style.preference_records(style.split_prompts()[0], args.pairs, seed=0)
    (work / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tokens = layout_tokens(rows, AutoTokenizer.from_pretrained(model_dir))
    peak = matmul_peak_flops()
    print(f"model {n_params / 1e6:.1f}M params, {args.pairs} pairs, batch {args.batch}, real tokens per pair: "
          f"{tokens['two_rows'] / args.pairs:.1f} in two rows (prompt twice), {tokens['one_row'] / args.pairs:.1f} in one; "
          f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s", flush=True)

    trl = run_trl(model_dir, rows, args.batch, args.lr, args.epochs)
    trl_pre = run_trl(model_dir, rows, args.batch, args.lr, args.epochs, precompute=True) if args.trl_precompute else None
    start_local_ray()
    ours = run_raydpo(model_dir, str(work / "pairs.jsonl"), str(work / "run"), args.batch, args.lr, args.epochs,
                      shared_prefix=True)
    two = run_raydpo(model_dir, str(work / "pairs.jsonl"), str(work / "run_two_rows"), args.batch, args.lr,
                     args.epochs, shared_prefix=False) if args.ablation else None
    ray.shutdown()

    passes = args.pairs * args.epochs  # pairs trained on, every epoch counted
    two_rows, one_row = tokens["two_rows"], tokens["one_row"]
    # FLOPs on real tokens: 6N per policy training token each epoch, 2N per reference forward token
    # (every epoch for a live reference, once when precomputed)
    flops = {"trl": 8 * n_params * two_rows * args.epochs,
             "trl_pre": (6 * args.epochs + 2) * n_params * two_rows,
             "ours": (6 * args.epochs + 2) * n_params * one_row,
             "two": (6 * args.epochs + 2) * n_params * two_rows}

    def line(name: str, secs: float, key: str, ran_tokens: float) -> str:
        return (f"{name:<46} {secs:7.1f} s  {passes / secs:6.1f} pairs/s  {two_rows * args.epochs / secs:6.0f} tok/s  "
                f"{ran_tokens / passes:5.1f}  MFU {flops[key] / secs / peak:5.1%}")

    print(f"\n{'':<46} {'time':>9}  {'pairs/s':>14}  {'tok/s':>12}  tok/pair run")
    print(line("TRL: set-up + train() + checkpoint", trl["total"], "trl", trl["padded_tokens"]))
    if trl_pre:
        print(line("TRL, precompute_ref_log_probs=True", trl_pre["total"], "trl_pre", trl_pre["padded_tokens"]))
    print(line("raydpo: data + reference pass + fit()", ours["total"], "ours", ours["tokens"]))
    if two:
        print(line("raydpo, two-row layout (shared_prefix=false)", two["total"], "two", two["tokens"]))
    print("(pairs/s counts every epoch; tok/s is TRL's real tokens per pair at every row's pairs/s; tok/pair run:\n"
          " tokens the training forward passes run per pair, padding included; MFU: FLOPs on real tokens / time / peak)")
    print(f"\nwhere the time goes: raydpo validation {ours['data']:.1f} s, tokenization + reference pass "
          f"{ours['reference']:.1f} s, "
          f"steps {ours['steps']:.1f} s, Ray Train start-up + checkpoint + shutdown {ours['fit'] - ours['steps']:.1f} s; "
          f"TRL set-up {trl['setup']:.1f} s, train() + checkpoint {trl['train']:.1f} s")
    extra = f"trl_precompute_ratio={trl_pre['total'] / ours['total']:.2f} " if trl_pre else ""
    extra += f"two_rows_ratio={trl['total'] / two['total']:.2f} " if two else ""
    print(f"RESULT params={n_params} pairs={args.pairs} epochs={args.epochs} trl_pairs_per_s={passes / trl['total']:.2f} "
          f"raydpo_pairs_per_s={passes / ours['total']:.2f} ratio={trl['total'] / ours['total']:.2f} {extra}"
          f"steady_ratio={trl['train'] / (ours['steps'] + ours['reference']):.2f} "
          f"mfu_trl={flops['trl'] / trl['total'] / peak:.3f} mfu_raydpo={flops['ours'] / ours['total'] / peak:.3f} "
          f"mfu_raydpo_steps={6 * args.epochs * n_params * one_row / ours['steps'] / peak:.3f}")


if __name__ == "__main__":
    main()
