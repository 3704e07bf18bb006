"""Architecture conformance: each model family a user may bring, built small with random
weights from its transformers config, through every path raydpo puts a model on.

    python bench/architectures.py [--archs llama,qwen2,...] [--skip-train] [--out DIR]

Per architecture (tokenizers behave like the real ones: Llama 3 and Gemma add a BOS, the
others add nothing; vocabularies are the tiny task's, so the style task's data tokenizes):

* `vllm_load`: a `SamplerPool` engine (in-process vLLM, CPU) starts from the folder;
* `greedy`: vLLM's greedy ids equal transformers' `generate` token for token, 8 prompts x 16 tokens;
* `lora`: peft attaches LoRA to every linear layer, and a forward/backward runs;
* `sft_step`, `dpo_step`: `jobs/sft.py` (2 steps) and `jobs/train_dpo.py` (1 step, shared-prefix
  rows where the attention allows) run on Ray Train from the folder;
* `publish_store`, `publish_path`: new weights reach the engine through the object store and
  through a saved folder, and greedy decoding equals transformers on the new weights after each.

A failing check is reported with its error's first line, and the checks after it still run
where they can. Ends with `RESULT architectures=... passed=...` (passed: architectures with
every check passing).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CHECKS = ("vllm_load", "greedy", "lora", "sft_step", "dpo_step", "publish_store", "publish_path")
SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def architectures():
    """name -> (config class, config kwargs, tokenizer style)."""
    import transformers as t

    return {
        "llama": (t.LlamaConfig, dict(SMALL), "llama3"),
        "qwen2": (t.Qwen2Config, dict(SMALL, tie_word_embeddings=True), "chatml"),  # q/k/v bias
        "qwen3": (t.Qwen3Config, dict(SMALL, head_dim=32, tie_word_embeddings=True), "chatml"),  # q/k norm
        "mistral": (t.MistralConfig, dict(SMALL, sliding_window=None), "chatml"),
        "gemma": (t.GemmaConfig, dict(SMALL, head_dim=32), "llama3"),
        "gemma2": (t.Gemma2Config, dict(SMALL, head_dim=32, sliding_window=128, query_pre_attn_scalar=32), "llama3"),
        "gpt_neox": (t.GPTNeoXConfig, dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.25),
                     "chatml"),
        "gpt2": (t.GPT2Config, dict(n_embd=128, n_layer=2, n_head=4, n_positions=256), "chatml"),
        "phi3": (t.Phi3Config, dict(SMALL, pad_token_id=0), "chatml"),
        "olmo2": (t.Olmo2Config, dict(SMALL), "chatml"),
    }


def build(name: str, out: Path, tokenizers: dict[str, Path]) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cls, kw, style = architectures()[name]
    tok = AutoTokenizer.from_pretrained(tokenizers[style])
    config = cls(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                 bos_token_id=tok.bos_token_id, **{k: v for k, v in kw.items() if k != "pad_token_id"})
    config.initializer_range = 0.1  # spikier logits than 0.02: fewer near-ties for greedy to fall on
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def hf_greedy(model, tok, prompts: list[str], max_new: int) -> list[list[int]]:
    from raydpo.data.tokenize import encode_prompts

    out = []
    for ids in encode_prompts(tok, prompts):
        x = torch.tensor([ids])
        with torch.no_grad():
            g = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out.append(g[0, len(ids):].tolist())
    return out


def same_greedy(pool, model, tok, prompts: list[str], version: int, max_new: int = 16) -> str | None:
    """None if vLLM's greedy ids equal transformers', else where they first differ."""
    from raydpo.records import SamplingSettings

    got = [list(s.token_ids) for s in pool.sample(prompts, SamplingSettings(n=1, temperature=0.0,
                                                                              max_new_tokens=max_new),
                                                   min_version=version)]
    want = hf_greedy(model, tok, prompts, max_new)
    for i, (a, b) in enumerate(zip(got, want)):
        b = b[:len(b) - 1] if b and b[-1] == tok.pad_token_id else b
        n = min(len(a), len(b))
        if a[:n] != b[:n] or (len(a) != len(b) and n < max_new):
            k = next((j for j in range(n) if a[j] != b[j]), n)
            return f"prompt {i}: token {k} differs (vLLM {a[k:k + 3]}, transformers {b[k:k + 3]})"
    return None


def perturbed(model, seed: int) -> dict:
    """Move every weight; the new state dict as the online trainer ships it (checkpoint names)."""
    from raydpo.weights import checkpoint_state

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return checkpoint_state(model, {k: v.detach().clone() for k, v in model.state_dict().items()})


def lora_check(folder: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    if not trainable:
        raise RuntimeError("no trainable LoRA parameters")
    x = torch.randint(3, model.config.vocab_size, (2, 12))
    peft(input_ids=x, labels=x).loss.backward()


def job(script: str, overrides: list[str], log: Path) -> None:
    r = subprocess.run([sys.executable, script, *overrides], cwd=REPO, capture_output=True, text=True)
    log.write_text(r.stdout + r.stderr)
    if r.returncode:
        lines = [ln for ln in (r.stdout + r.stderr).splitlines() if "Error" in ln or "error" in ln]
        raise RuntimeError((lines[-1] if lines else f"exit {r.returncode}")[:300] + f" (log: {log})")


def pairs_file(path: Path) -> Path:
    from raydpo.tasks import style

    train, _ = style.split_prompts(0)
    rows = [{"prompt": p, "chosen": f" {style.parse_prompt(p)[0]} is fine please.", "rejected": " no"}
            for p in train[:32]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_arch(name: str, work: Path, tokenizers: dict[str, Path], skip_train: bool) -> dict[str, str]:
    """check -> 'ok' or the reason it failed ('-' where it could not run)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydpo.sampler.pool import SamplerPool
    from raydpo.tasks import style

    res = {c: "-" for c in CHECKS}
    folder = work / name
    try:
        build(name, folder, tokenizers)
    except Exception as e:
        return {c: f"build: {type(e).__name__}: {str(e).splitlines()[0][:200]}" for c in CHECKS}
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts = style.split_prompts(0)[1][:8]

    def attempt(check, fn):
        try:
            why = fn()
            res[check] = "ok" if why is None else why
        except Exception as e:
            res[check] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"

    attempt("lora", lambda: lora_check(folder))
    if not skip_train:
        run = work / f"{name}-run"
        attempt("sft_step", lambda: job("jobs/sft.py", [f"run_dir={run}/sft", f"model.path={folder}",
                                                         "trainer.sft_steps=2", "trainer.sft_batch_size=8"],
                                        work / f"{name}-sft.log"))
        attempt("dpo_step", lambda: job("jobs/train_dpo.py", [f"run_dir={run}/dpo", f"model.path={folder}",
                                                               f"data.train_path={pairs_file(work / 'pairs.jsonl')}",
                                                               "trainer.max_steps=1", "trainer.batch_size=8",
                                                               "trainer.micro_batch_size=8"],
                                        work / f"{name}-dpo.log"))
    pool = None
    try:
        pool = SamplerPool(str(folder), 1, cpus=2, kv_cache_gib=1, start_timeout_s=300)
        res["vllm_load"] = "ok"
    except Exception as e:
        res["vllm_load"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
    if pool is not None:
        attempt("greedy", lambda: same_greedy(pool, model, tok, prompts, 0))

        def by_store():
            pool.publish(1, state_dict=perturbed(model, 1))
            return same_greedy(pool, model, tok, prompts, 1)

        def by_path():
            perturbed(model, 2)
            update = work / f"{name}-update"
            model.save_pretrained(update)
            pool.publish(2, path=str(update))
            return same_greedy(pool, model, tok, prompts, 2)

        attempt("publish_store", by_store)
        attempt("publish_path", by_path)
        pool.shutdown()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(architectures()))
    ap.add_argument("--skip-train", action="store_true", help="leave out the Ray Train jobs (sft_step, dpo_step)")
    ap.add_argument("--out", default=None, help="keep folders and job logs here (default: a temporary folder)")
    args = ap.parse_args()
    unknown = [a for a in args.archs.split(",") if a not in architectures()]
    if unknown:
        ap.error(f"--archs: unknown {unknown}; choose from {', '.join(architectures())}")
    import ray

    from common import start_local_ray
    from raydpo.tasks import style
    from raydpo.tiny_model import build_tiny_model

    work = Path(args.out or tempfile.mkdtemp(prefix="raydpo-archs-"))
    tokenizers = {s: build_tiny_model(style.corpus(), work / f"tokenizer-{s}", tokenizer_style=s)
                  for s in ("chatml", "llama3")}
    start_local_ray()
    results = {}
    try:
        for name in args.archs.split(","):
            t = time.time()
            results[name] = run_arch(name, work, tokenizers, args.skip_train)
            fails = [c for c, v in results[name].items() if v != "ok"]
            print(f"[bench] {name}: {'all checks pass' if not fails else 'not ok: ' + ', '.join(fails)} "
                  f"({time.time() - t:.0f}s)", flush=True)
    finally:
        ray.shutdown()
    print("\n| architecture | " + " | ".join(CHECKS) + " |\n|---|" + "---|" * len(CHECKS))
    for name, res in results.items():
        print(f"| {name} | " + " | ".join("pass" if res[c] == "ok" else "skipped" if res[c] == "-" else "FAIL"
                                          for c in CHECKS) + " |")
    for name, res in results.items():
        for c in CHECKS:
            if res[c] not in ("ok", "-"):
                print(f"{name} {c}: {res[c]}")
    skipped = ("sft_step", "dpo_step") if args.skip_train else ()
    passed = [n for n, r in results.items() if all(v == "ok" for c, v in r.items() if c not in skipped)]
    print(f"RESULT architectures={len(results)} passed={len(passed)} passing={','.join(passed)}")
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
