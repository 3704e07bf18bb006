"""Interim main job: the pieces of online DPO that exist today, end to end.

    python jobs/demo.py [--config FILE] [key=value ...]

1. generate the synthetic style task (../shared/DEMO_TASK.md) and build the
   tiny Llama + tokenizer into <run_dir>/base_model;
2. start a local Ray (or join RAY_ADDRESS / cluster.address);
3. start the vLLM sampler pool on the base model; sample the held-out prompts
   and score them with the rule judge;
4. run the SFT stage on Ray Train on mixed-quality demonstrations;
5. publish the SFT weights to the same running pool (policy_version 1), sample
   and judge again;
6. print a table per rule and write every judged sample to <run_dir>/samples.jsonl.

The online-DPO loop (judge service, DPO iterations, report) replaces this job
once the judge and loop issues land; the SFT policy here is its starting point.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from raydpo.config import ConfigError
from raydpo.data.formats import DataError
from raydpo.records import SamplingSettings
from raydpo.runner import base_model, init_ray, job_config, print_table, read_tokenized
from raydpo.tasks import style

RULES = ("keyword", "length", "period", "polite")


def judge(samples) -> dict[str, float]:
    scores = [style.rule_scores(s.prompt, s.text) for s in samples]
    out = {r: statistics.mean(x[r] for x in scores) for r in RULES}
    out["judge score"] = statistics.mean(sum(x.values()) / 4 for x in scores)
    return out


def main(argv: list[str] | None = None) -> int:
    cfg = job_config(__doc__, argv)
    run_dir = Path(cfg.run_dir)
    t0 = time.time()
    try:
        model = base_model(cfg)
        init_ray(cfg)
    except (ConfigError, DataError) as e:  # named, no traceback
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    print(f"[demo] tiny model ready ({time.time() - t0:.0f}s)")

    from transformers import AutoTokenizer

    from raydpo.sampler import SamplerPool
    from raydpo.train.trainer import fit, make_spec

    pool = SamplerPool.from_config(cfg, str(model))
    print(f"[demo] {len(pool.actors)} vLLM sampler engine(s) up ({time.time() - t0:.0f}s)")
    _, held_out = style.split_prompts(cfg.seed)
    prompts = held_out[: cfg.loop.eval_prompts]
    settings = SamplingSettings.from_config(cfg.sampler)
    before = pool.sample(prompts, settings)
    print(f"[demo] base model sampled: {len(before)} responses, policy_version {before[0].policy_version}")

    demos = run_dir / "sft_demonstrations.jsonl"
    with open(demos, "w") as f:
        for r in style.sft_records(cfg.trainer.sft_steps * cfg.trainer.sft_batch_size, cfg.seed):
            f.write(json.dumps(r) + "\n")
    ds = read_tokenized(cfg, str(demos), model)
    pad = AutoTokenizer.from_pretrained(model).pad_token_id
    sft_ckpt = fit(make_spec(cfg, "sft", str(model), cfg.run_dir), ds, cfg, "sft", pad)
    print(f"[demo] SFT done ({time.time() - t0:.0f}s): {sft_ckpt}")

    secs = pool.publish(1, path=str(sft_ckpt))
    after = pool.sample(prompts, settings)
    print(f"[demo] SFT weights published to the running pool in {secs:.2f}s; "
          f"sampled again at policy_version {after[0].policy_version}")
    pool.shutdown()

    with open(run_dir / "samples.jsonl", "w") as f:
        for s in before + after:
            f.write(json.dumps({"policy_version": s.policy_version, "prompt": s.prompt, "response": s.text,
                                **style.rule_scores(s.prompt, s.text)}) + "\n")
    b, a = judge(before), judge(after)
    print("\n| rule | base model (v0) | after SFT (v1) |\n|---|---|---|")
    for k in (*RULES, "judge score"):
        print(f"| {k} | {b[k]:.3f} | {a[k]:.3f} |")
    print_table("demo done", [("held-out prompts", str(len(prompts))),
                              ("samples per prompt", str(settings.n)),
                              ("wall time", f"{time.time() - t0:.0f}s"),
                              ("judged samples", str(run_dir / "samples.jsonl")),
                              ("SFT checkpoint", str(sft_ckpt))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
