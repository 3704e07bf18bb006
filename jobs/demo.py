"""Interim main job: the smallest real end-to-end path that works today.

    python jobs/demo.py [--config FILE] [key=value ...]

1. generate the synthetic style task (../shared/DEMO_TASK.md);
2. build the tiny Llama + tokenizer into <run_dir>/base_model;
3. start a local Ray (or join RAY_ADDRESS / cluster.address);
4. sample k responses per held-out prompt from a vLLM engine in a Ray actor;
5. score them with the rule judge and print a table.

The online-DPO loop (SFT, judge service, training, weight sync) replaces this
job once it exists; until then the untrained model scores near zero, which is
the honest starting point.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import ray

from raydpo.config import ConfigError, load_config, save_config
from raydpo.tasks import style
from raydpo.tiny_model import build_tiny_model


@ray.remote
class DemoSampler:
    def __init__(self, model_dir: str, max_model_len: int, kv_cache_gib: float, seed: int):
        from raydpo.vllm_engine import make_llm

        self.llm = make_llm(model_dir, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib, seed=seed)

    def sample(self, prompts: list[str], n: int, temperature: float, max_tokens: int) -> list[list[str]]:
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens)
        return [[c.text for c in o.outputs] for o in self.llm.generate(prompts, params, use_tqdm=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(cfg.run_dir)
    save_config(cfg, run_dir)

    t0 = time.time()
    model_dir = build_tiny_model(style.corpus(cfg.seed), run_dir / "base_model", cfg.model.tiny, seed=cfg.seed)
    print(f"[demo] built tiny model in {time.time() - t0:.1f}s -> {model_dir}")

    ray.init(address=cfg.cluster.address, num_cpus=cfg.cluster.num_cpus)
    sampler = DemoSampler.options(num_cpus=cfg.cluster.sampler.cpus).remote(
        str(model_dir.resolve()), cfg.sampler.max_model_len, cfg.sampler.kv_cache_gib, cfg.seed
    )
    _, held_out = style.split_prompts(cfg.seed)
    prompts = held_out[: cfg.loop.eval_prompts]
    t1 = time.time()
    texts = ray.get(
        sampler.sample.remote(prompts, cfg.sampler.samples_per_prompt, cfg.sampler.temperature, cfg.sampler.max_new_tokens),
        timeout=600,
    )
    print(f"[demo] sampled {len(prompts)} x {cfg.sampler.samples_per_prompt} in {time.time() - t1:.1f}s (incl. engine start)")

    rows = [(p, r, style.rule_scores(p, r)) for p, rs in zip(prompts, texts) for r in rs]
    with open(run_dir / "samples.jsonl", "w") as f:
        for p, r, s in rows:
            f.write(json.dumps({"prompt": p, "response": r, **s}) + "\n")
    print("\n| rule | mean credit |\n|---|---|")
    for rule in ("keyword", "length", "period", "polite"):
        print(f"| {rule} | {statistics.mean(s[rule] for _, _, s in rows):.3f} |")
    print(f"| judge score | {statistics.mean(sum(s.values()) / 4 for _, _, s in rows):.3f} |")
    print(f"\n[demo] wrote {run_dir}/samples.jsonl and {run_dir}/config.yaml")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
