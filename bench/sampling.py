"""Sampling throughput: the vLLM sampler pool vs transformers' generate, in one run.

    python bench/sampling.py [--prompts 128] [--n 4] [--max-new 64] [--engines 1]

Workload (an online-DPO iteration): a ~25M-parameter Llama, briefly trained on
the style task so it stops at EOS after varied lengths; `--prompts` prompts x
`--n` samples at temperature 1.0, up to `--max-new` tokens. transformers runs
`generate(do_sample=True, num_return_sequences=n)` on the whole batch (left
padding) with every CPU; the pool runs `--engines` in-process vLLM engines
in Ray actors sharing the same CPUs. Generated tokens are counted up to and
including EOS on both sides.

FLOP/s: ~2N FLOPs per generated or prompt token (N parameters), against the
fp32 matmul peak measured here with torch.matmul. Also printed: weight-sync
latency (state dict through the object store into `reload_weights`) for the
tiny demo model and for a ~100M-parameter random Llama.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from common import llama_shape, matmul_peak_flops, start_local_ray


def quick_sft(model_dir: str, steps: int = 80, batch: int = 32) -> None:
    """Teach the random model the task's shape, so samples end at EOS with varied lengths."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydpo.tasks import style

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    texts = [p + r + tok.eos_token for p, r in style.demonstrations(style.split_prompts()[0], steps * batch, seed=0)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i in range(steps):
        b = tok(texts[i * batch:(i + 1) * batch], return_tensors="pt", padding=True)
        model(**b, labels=b.input_ids.masked_fill(b.attention_mask == 0, -100)).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(model_dir)


def hf_generate(model_dir: str, prompts: list[str], n: int, max_new: int) -> tuple[float, int, int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    enc = tok(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new,
                             num_return_sequences=n, pad_token_id=tok.pad_token_id)
    secs = time.perf_counter() - t
    gen = out[:, enc.input_ids.shape[1]:]
    tokens = 0
    for row in gen.tolist():
        tokens += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
    prompt_tokens = int(enc.attention_mask.sum()) * n
    return secs, tokens, prompt_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--engines", type=int, default=1)
    args = ap.parse_args()

    import ray
    from transformers import AutoModelForCausalLM

    from raydpo.config import TinyModelConfig
    from raydpo.records import SamplingSettings
    from raydpo.sampler.pool import SamplerPool
    from raydpo.tasks import style
    from raydpo.tiny_model import build_tiny_model, count_parameters

    work = Path(tempfile.mkdtemp(prefix="bench_sampling_"))
    model_dir = str(build_tiny_model(style.corpus(), work / "m25", llama_shape(512, 8, max_position_embeddings=256)))
    quick_sft(model_dir)
    n_params = count_parameters(AutoModelForCausalLM.from_pretrained(model_dir))
    prompts = style.split_prompts()[1][: args.prompts]
    peak = matmul_peak_flops()
    print(f"model {n_params / 1e6:.1f}M params; {len(prompts)} prompts x {args.n}, max {args.max_new} new tokens; "
          f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")

    hf_secs, hf_tokens, hf_prompt_tokens = hf_generate(model_dir, prompts, args.n, args.max_new)


    cpus = os.cpu_count()
    start_local_ray(cpus)
    pool = SamplerPool(model_dir, num_engines=args.engines, cpus=cpus / args.engines, kv_cache_gib=2)
    settings = SamplingSettings(n=args.n, temperature=1.0, max_new_tokens=args.max_new, seed=0)
    pool.sample(prompts[:8], settings)  # warm-up
    t = time.perf_counter()
    samples = pool.sample(prompts, settings)
    pool_secs = time.perf_counter() - t
    pool_tokens = sum(len(s.token_ids) for s in samples)
    lengths = sorted(len(s.token_ids) for s in samples)
    state = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}
    sync_25m = min(pool.publish(v, state_dict=state) for v in (1, 2, 3))
    pool.shutdown()

    tiny_dir = str(build_tiny_model(style.corpus(), work / "tiny"))
    big = TinyModelConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                          intermediate_size=3072)
    big_dir = str(build_tiny_model(style.corpus(), work / "m100", big))
    syncs = {}
    for name, d in (("tiny", tiny_dir), ("100M", big_dir)):
        p = SamplerPool(d, num_engines=1, cpus=cpus, kv_cache_gib=1)
        sd = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(d).state_dict().items()}
        syncs[name] = min(p.publish(v, state_dict=sd) for v in (1, 2, 3))
        syncs[name + "_params"] = count_parameters(AutoModelForCausalLM.from_pretrained(d))
        p.shutdown()
    ray.shutdown()

    prompt_tokens = hf_prompt_tokens  # the same prompts and n on both sides
    hf_tps, pool_tps = hf_tokens / hf_secs, pool_tokens / pool_secs
    pool_flops = 2 * n_params * (pool_tokens + prompt_tokens) / pool_secs
    hf_flops = 2 * n_params * (hf_tokens + prompt_tokens) / hf_secs
    print(f"response lengths (pool): min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}")
    print(f"transformers generate   {hf_secs:6.1f} s  {hf_tokens:6d} tokens  {hf_tps:7.0f} tok/s  {hf_flops / peak:5.1%} of peak")
    print(f"sampler pool ({args.engines} engine)  {pool_secs:6.1f} s  {pool_tokens:6d} tokens  {pool_tps:7.0f} tok/s  "
          f"{pool_flops / peak:5.1%} of peak")
    print(f"weight sync: tiny ({syncs['tiny_params'] / 1e6:.2f}M) {syncs['tiny']:.3f} s, "
          f"25M {sync_25m:.3f} s, 100M ({syncs['100M_params'] / 1e6:.0f}M) {syncs['100M']:.3f} s")
    print(f"RESULT params={n_params} hf_tok_s={hf_tps:.0f} pool_tok_s={pool_tps:.0f} ratio={pool_tps / hf_tps:.2f} "
          f"pool_peak_frac={pool_flops / peak:.3f} sync_tiny_s={syncs['tiny']:.3f} sync_25m_s={sync_25m:.3f} "
          f"sync_100m_s={syncs['100M']:.3f}")


if __name__ == "__main__":
    main()
