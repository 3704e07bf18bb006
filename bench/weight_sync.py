"""Weight sync at scale: publishing a new policy version to vLLM sampler engines, at ~100M,
~350M and ~1B parameters, against this machine's memcpy bandwidth.

    python bench/weight_sync.py [--sizes 100m,350m,1b] [--engines 1,2] [--repeats 3] [--bucket-mb 512] [--out DIR]

Per size, a random-weight Llama (vocab 32000, fp32, tied head, 64-wide heads) is built and
saved once; then, for each engine count, a `SamplerPool` of in-process vLLM engines starts
from it and receives new weights `--repeats` times by each path:

* **object store** (the loop's default): the trainer's state dict goes into the object store
  once as numpy arrays, in buckets of `--bucket-mb` (`put`), and every engine reads it
  zero-copy from shared memory into
  `reload_weights(weights_iterator=...)` (`load`);
* **path**: the trainer saves a safetensors folder (`save`, which the loop does anyway for its
  checkpoint) and every engine reads it back into the same reload (`load`).

Reported: the fastest repeat (put + load), GB/s of model bytes over that publish, the
samplers' memory split in two, because RSS alone misleads here: private memory (RssAnon: the
engine, its KV cache and what a reload allocates) after start and after the publishes, and
shared object-store pages the sampler has touched (RssShmem). The latter grows with each new
version's object until the store reuses its memory: it is the one object-store copy per
node, counted in every process that reads it, not a copy per sampler. Also the driver's
peak RSS (it holds the "trainer's" state dict), and memcpy GB/s (torch `copy_` of 1 GiB, best
of 5, in the same run) as the physical limit of a copy on one node, beside the GB/s of a copy
into freshly allocated memory (first-touch page faults), which is what vLLM's reload pays: its
layerwise reload materializes each layer in new tensors, loads and processes (on CPU: repacks)
them there, and copies the result back.

Per size, also the sender's peak memory above the model while it puts one version into the
object store, in copies of the model, measured in a fresh process that loads the model
(`/proc/self/clear_refs` resets its peak RSS first): **bucketed** (the trainer's route,
`raydpo.train.learner.weight_buckets` into `raydpo.weights.put_weights`) against the
baseline **whole** (the previous route: clone every tensor, then put the clone). The object
store's own copy counts in the sender's RSS (it writes those pages), so bucketed should be
about 1 copy and whole about 2.

Ends with `RESULT sync_100m_s=... sync_350m_s=... sync_1b_s=... gbps_100m=... memcpy_gbps=...
sender_copies_whole=... sender_copies_bucketed=... ratio=...`, where sync_X_s is the
object-store publish (put + load) to one engine, sender copies are the largest size's, and
ratio is whole / bucketed extra memory.
"""

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import start_local_ray

# (hidden, layers): 64-wide heads, MLP 2.75x the width, vocab 32000 (tied): about 111M, 341M, 1.03B
SIZES = {"100m": (768, 12), "350m": (1024, 24), "1b": (2048, 20)}
VOCAB = 32000


def memcpy_gbps(gib: float = 1.0, reps: int = 5) -> tuple[float, float]:
    """GB/s of a copy into memory already touched, and into freshly allocated memory (the
    kernel maps and zeroes each new page on first touch: what a copy into new tensors pays)."""
    src = torch.ones(int(gib * (1 << 30)) // 4)
    touched = torch.empty_like(src).copy_(src)
    best = min(_timed(lambda: touched.copy_(src)) for _ in range(reps))
    fresh = min(_timed(lambda: torch.empty_like(src).copy_(src)) for _ in range(reps))
    return src.numel() * 4 / best / 1e9, src.numel() * 4 / fresh / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def build(folder: Path, hidden: int, layers: int, tokenizer_dir: Path) -> dict:
    """A random Llama saved as safetensors beside the tiny model's tokenizer; its state dict."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=256, tie_word_embeddings=True, eos_token_id=1, pad_token_id=0,
                      bos_token_id=None)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy(f, folder / f.name)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    del model
    return state


def sampler_pids(pool) -> list[int]:
    import ray

    return ray.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in pool.actors])


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


_SENDER = """
import ctypes, json, sys, ray, torch
from transformers import AutoModelForCausalLM
from raydpo.train.learner import weight_buckets
from raydpo.weights import put_weights
folder, route, bucket_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
ray.init(address=sys.argv[4], log_to_driver=False)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
for p in model.parameters():  # into private memory, as a trainer's are: from_pretrained may leave them
    p.data = p.data.clone()   # views of the mmapped file, whose pages would count when first read
model_bytes = sum(v.numel() * v.element_size() for v in model.parameters())
ctypes.CDLL("libc.so.6").malloc_trim(0)
def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
before = kib("VmRSS")
if route == "whole":
    clone = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref = ray.put({k: v.numpy() for k, v in clone.items()})
else:
    stored = put_weights(weight_buckets(model, None, bucket_bytes))
print("SENDER " + json.dumps({"copies": (kib("VmHWM") - before) * 1024 / model_bytes}), flush=True)
"""


def sender_copies(folder: Path, route: str, bucket_mb: int) -> float:
    """Peak memory above the loaded model while one version goes into the object store, in
    copies of the model, in a fresh process (so nothing else's peak counts)."""
    import subprocess
    import sys

    import ray

    address = ray.get_runtime_context().gcs_address
    out = subprocess.run([sys.executable, "-c", _SENDER, str(folder), route, str(bucket_mb << 20), address],
                         capture_output=True, text=True, timeout=900)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("SENDER ")), None)
    if line is None:
        raise RuntimeError(f"sender ({route}) failed: {out.stderr[-2000:]}")
    import json

    return json.loads(line[len("SENDER "):])["copies"]


def measure(folder: Path, state: dict, engines: int, repeats: int, bucket_mb: int, lean: bool = False) -> dict:
    """`lean` (1B to 2 engines, for memory): the driver puts the state once and drops its own
    copy (`state` is emptied); each repeat publishes that one stored version under a new
    version number (the same numbers reload at the same cost; the put is timed once), and
    the path route loads the model's own folder (no save)."""
    from safetensors.torch import save_file

    from raydpo.sampler.pool import SamplerPool
    from raydpo.weights import buckets, put_weights

    kept = None
    if lean:
        t = time.perf_counter()
        kept = put_weights(buckets(state.items(), bucket_mb << 20))
        lean_put = time.perf_counter() - t
        state.clear()
    pool = SamplerPool(str(folder), num_engines=engines, cpus=max(1, (os.cpu_count() or 2) // engines), kv_cache_gib=1,
                       sync_timeout_s=600)
    pids = sampler_pids(pool)
    anon_start = max(vm_kib(p, "RssAnon") for p in pids)
    puts, loads, saves, path_loads, anon, shmem = [], [], [], [], [], []
    version = 0
    for r in range(repeats):
        for v in state.values():  # a new version: the engines really load other numbers
            v.add_(1e-3)
        t = time.perf_counter()
        stored = kept or put_weights(buckets(state.items(), bucket_mb << 20))
        puts.append(lean_put if lean else time.perf_counter() - t)
        version += 1
        loads.append(pool.publish(version, state_dict=stored))
        del stored
        out = folder.parent / f"{folder.name}-update"
        t = time.perf_counter()
        if lean:
            out = folder
        else:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, str(out / "model.safetensors"))
        saves.append(float("nan") if lean else time.perf_counter() - t)
        version += 1
        path_loads.append(pool.publish(version, path=str(out)))
        anon.append(max(vm_kib(p, "RssAnon") for p in pids))
        shmem.append(max(vm_kib(p, "RssShmem") for p in pids))
    pool.shutdown()
    shutil.rmtree(folder.parent / f"{folder.name}-update", ignore_errors=True)
    best = min(range(repeats), key=lambda r: puts[r] + loads[r])
    gib = 1 << 20
    return {"put": puts[best], "load": loads[best], "save": min(saves, key=lambda s: s if s == s else 1e9),
            "path_load": min(path_loads),
            "anon_start_gib": anon_start / gib, "anon_gib": max(anon) / gib, "shmem_gib": max(shmem) / gib}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100m,350m,1b")
    ap.add_argument("--engines", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines-1b", type=int, default=2, help="most engines for the 1B model (memory: 2 engines peaked "
                    "at 20.4-21.6 of 24 GiB here, with the driver's copy dropped)")
    ap.add_argument("--bucket-mb", type=int, default=512, help="weight sync bucket size (sampler.sync_bucket_mb)")
    ap.add_argument("--out", default=None, help="where the models are built (default: a temporary folder, removed)")
    args = ap.parse_args()
    unknown = [s for s in args.sizes.split(",") if s not in SIZES]
    if unknown:
        ap.error(f"--sizes: unknown {unknown}; choose from {', '.join(SIZES)}")
    import ray

    from raydpo.tasks import style
    from raydpo.tiny_model import build_tiny_model

    work = Path(args.out or tempfile.mkdtemp(prefix="raydpo-wsync-"))
    tok_dir = build_tiny_model(style.corpus(), work / "tokenizer-source")
    bandwidth, fresh_bandwidth = memcpy_gbps()
    print(f"[bench] memcpy: {bandwidth:.1f} GB/s into touched memory, {fresh_bandwidth:.1f} GB/s into new "
          f"allocations (torch copy_ of 1 GiB, best of 5)", flush=True)
    start_local_ray()
    rows, result, senders = [], {}, []
    try:
        for size in args.sizes.split(","):
            hidden, layers = SIZES[size]
            folder = work / size
            state = build(folder, hidden, layers, Path(tok_dir))
            params = sum(v.numel() for k, v in state.items() if k != "lm_head.weight")
            gb = params * 4 / 1e9
            print(f"[bench] {size}: {params / 1e6:.0f}M parameters, {gb:.2f} GB", flush=True)
            for engines in sorted(int(e) for e in args.engines.split(",")):  # a lean run (1B, 2) empties `state`: last
                if size == "1b" and engines > args.engines_1b:
                    print(f"[bench] 1b -> {engines} engines: skipped (--engines-1b {args.engines_1b}: each engine holds "
                          f"its own 4.4 GB copy and KV cache, beside the object store's copy)", flush=True)
                    continue
                lean = size == "1b" and engines > 1  # the last count: it empties `state`
                m = measure(folder, state, engines, args.repeats, args.bucket_mb, lean=lean)
                total = m["put"] + m["load"]
                rows.append((size, params, engines, m, total, gb / total))
                print(f"[bench] {size} -> {engines} engine(s): object store {total:.2f} s (put {m['put']:.2f} + "
                      f"load {m['load']:.2f}), path {m['path_load']:.2f} s (+ save {m['save']:.2f})", flush=True)
                if engines == 1:
                    result[f"sync_{size}_s"] = round(total, 3)
                    result[f"gbps_{size}"] = round(gb / total, 2)
            copies = {route: sender_copies(folder, route, args.bucket_mb) for route in ("whole", "bucketed")}
            print(f"[bench] {size}: the sender's peak above the model, in model copies: whole {copies['whole']:.2f}, "
                  f"bucketed {copies['bucketed']:.2f}", flush=True)
            senders.append((size, copies))
            shutil.rmtree(folder, ignore_errors=True)
            del state
    finally:
        ray.shutdown()
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| model | engines | object store: put + load = s | GB/s | % of memcpy | path: save, load s "
          "| sampler private RSS: started -> after publishes, GiB | sampler shared (object store) RSS, GiB |"
          "\n|---|---:|---|---:|---:|---|---|---:|")
    for size, params, engines, m, total, gbps in rows:
        print(f"| {size} ({params / 1e6:.0f}M) | {engines} | {m['put']:.2f} + {m['load']:.2f} = {total:.2f} | "
              f"{gbps:.2f} | {100 * gbps / bandwidth:.0f}% | {m['save']:.2f}, {m['path_load']:.2f} | "
              f"{m['anon_start_gib']:.2f} -> {m['anon_gib']:.2f} | {m['shmem_gib']:.2f} |")
    print(f"driver (trainer stand-in) peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20):.1f} GiB")
    print("\n| model | sender peak above the model, whole (clone, then put) | bucketed |\n|---|---:|---:|")
    for size, copies in senders:
        print(f"| {size} | {copies['whole']:.2f} copies | {copies['bucketed']:.2f} copies |")
    whole, bucketed = senders[-1][1]["whole"], senders[-1][1]["bucketed"]
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()) + f" memcpy_gbps={bandwidth:.1f} "
          f"alloc_copy_gbps={fresh_bandwidth:.1f} sender_copies_whole={whole:.2f} sender_copies_bucketed={bucketed:.2f} "
          f"ratio={whole / bucketed:.2f}")


if __name__ == "__main__":
    main()
