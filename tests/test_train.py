"""DPO/SFT training on Ray Train: equivalences, resume after a killed worker,
DeepSpeed, LoRA, and a real improvement on held-out pairs."""

import json
import os
import signal
import threading
import time

import pytest
import torch

from raydpo.config_io import load_config
from raydpo.tasks import style

pytestmark = pytest.mark.slow  # starts Ray, vLLM or Serve, or trains: `make test-fast` leaves it out

BATCH = 16
STEPS = 4


@pytest.fixture(scope="module")
def text_pairs(ray_local, tmp_path_factory):
    """Validated, not yet tokenized pairs."""
    from raydpo.data.pipeline import read_pairs

    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    with open(path, "w") as f:
        for r in style.preference_records(style.split_prompts()[0], BATCH * STEPS * 2, seed=3):
            f.write(json.dumps(r) + "\n")
    good, _ = read_pairs(str(path))
    return good


@pytest.fixture(scope="module")
def pairs_ds(text_pairs, tiny_model_dir):
    from raydpo.data.pipeline import tokenize

    return tokenize(text_pairs, str(tiny_model_dir), 48, 80).materialize()


def run(tmp_path, name, ds, model_dir, pad_id, *overrides, precomputed=False):
    from raydpo.train.spec import make_spec
    from raydpo.train.staged import fit

    cfg = load_config(None, [f"run_dir={tmp_path}", f"trainer.batch_size={BATCH}", "trainer.reference_logps=live",
                             f"trainer.max_steps={STEPS}", "trainer.epochs=4",
                             "cluster.trainer.cpus=1", *overrides])  # 1 CPU each: 2 workers fit the 4-CPU test Ray
    ckpt = fit(make_spec(cfg, "dpo", str(model_dir), str(tmp_path / name)), ds, cfg, name, pad_id,
               precomputed_reference=precomputed)
    rows = [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")]
    last = {r["step"]: r for r in rows}  # after a restart, the re-done steps' last record counts
    return [last[s] for s in sorted(last)], ckpt


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """run() for the equivalence tests, each distinct (data, overrides) trained once per module:
    several tests compare against the same plain run (1 worker, micro-batch 16) or the same
    2-worker DDP run, and a Ray Train fit costs ~15 s here. Results are read-only."""
    done = {}

    def shared(name, ds, model_dir, pad_id, *overrides, precomputed=False):
        key = (id(ds), str(model_dir), tuple(sorted(overrides)), precomputed)
        if key not in done:
            done[key] = run(tmp_path_factory.mktemp(name), name, ds, model_dir, pad_id, *overrides,
                            precomputed=precomputed)
        return done[key]

    return shared


def traj(rows, key):
    return [r[f"dpo/{key}"] for r in rows]


def test_two_workers_match_one_worker_with_double_micro_batch(tmp_path, shared_run, pairs_ds, tiny_model_dir, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    one, _ = shared_run("one", pairs_ds, tiny_model_dir, pad, "cluster.trainer.count=1", f"trainer.micro_batch_size={BATCH}")
    two, _ = shared_run("two", pairs_ds, tiny_model_dir, pad, "cluster.trainer.count=2", f"trainer.micro_batch_size={BATCH // 2}")
    acc, _ = run(tmp_path, "acc", pairs_ds, tiny_model_dir, pad, "cluster.trainer.count=1", f"trainer.micro_batch_size={BATCH // 4}")
    assert len(one) == len(two) == len(acc) == STEPS
    assert traj(one, "loss")[0] == pytest.approx(0.693147, abs=1e-6)  # policy == reference at step 0
    assert traj(one, "loss")[-1] < traj(one, "loss")[0]  # and it learns
    for other in (two, acc):  # 2 workers x 8, and 1 worker x 4 micro-batches of 4
        assert traj(other, "loss") == pytest.approx(traj(one, "loss"), rel=1e-4, abs=1e-5)
        assert traj(other, "grad_norm") == pytest.approx(traj(one, "grad_norm"), rel=1e-4)


def test_precomputed_reference_matches_live(tmp_path, shared_run, pairs_ds, tiny_model_dir, tiny_tokenizer):
    from raydpo.train.reference import precompute_reference

    pad = tiny_tokenizer.pad_token_id
    with_ref = precompute_reference(pairs_ds, str(tiny_model_dir), pad, batch_size=7).materialize()
    assert {"reference_chosen_logps", "reference_rejected_logps"} <= set(with_ref.schema().names)
    live, _ = shared_run("one", pairs_ds, tiny_model_dir, pad, "cluster.trainer.count=1", f"trainer.micro_batch_size={BATCH}")
    pre, _ = run(tmp_path, "pre", with_ref, tiny_model_dir, pad, "trainer.reference_logps=precomputed", precomputed=True)
    assert traj(pre, "loss") == pytest.approx(traj(live, "loss"), rel=1e-4, abs=1e-5)
    assert traj(pre, "rewards/margins") == pytest.approx(traj(live, "rewards/margins"), rel=1e-3, abs=1e-5)


def test_reference_pass_that_tokenizes_matches_tokenize_then_score(text_pairs, pairs_ds, tiny_model_dir, tiny_tokenizer):
    """The one-stage path (text rows in, the scorer tokenizes them) gives the same rows as
    tokenize() followed by the reference pass: same token ids, truncation flags and log-probs."""
    from raydpo.train.reference import precompute_reference

    pad = tiny_tokenizer.pad_token_id
    two_stage = precompute_reference(pairs_ds, str(tiny_model_dir), pad, batch_size=7).take_all()
    one_stage = precompute_reference(text_pairs, str(tiny_model_dir), pad, batch_size=7, tokenize=(48, 80)).take_all()
    assert len(one_stage) == len(two_stage) == BATCH * STEPS * 2
    for a, b in zip(one_stage, two_stage):
        for k in ("prompt", "prompt_ids", "chosen_ids", "rejected_ids", "prompt_truncated", "response_truncated"):
            assert list(a[k]) == list(b[k]) if k.endswith("_ids") else a[k] == b[k], k
        assert a["reference_chosen_logps"] == pytest.approx(b["reference_chosen_logps"], abs=1e-5)
        assert a["reference_rejected_logps"] == pytest.approx(b["reference_rejected_logps"], abs=1e-5)
    assert one_stage[0]["reference_chosen_logps"] < 0


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_ddp(tmp_path, shared_run, pairs_ds, tiny_model_dir, tiny_tokenizer, stage):
    pad = tiny_tokenizer.pad_token_id
    common = ("cluster.trainer.count=2", f"trainer.micro_batch_size={BATCH // 2}")
    ddp, _ = shared_run("two", pairs_ds, tiny_model_dir, pad, *common)
    ds2, ckpt = run(tmp_path, f"zero{stage}", pairs_ds, tiny_model_dir, pad, *common, "trainer.strategy=deepspeed",
                    f"trainer.zero_stage={stage}")
    assert traj(ds2, "loss") == pytest.approx(traj(ddp, "loss"), rel=1e-3, abs=1e-4)
    assert traj(ds2, "grad_norm") == pytest.approx(traj(ddp, "grad_norm"), rel=1e-3)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpt)  # the DeepSpeed checkpoint is a plain HF folder


def _cmdline(p) -> list[str]:
    import psutil

    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def _kill_a_worker_after(metrics_file, step, stop, killed_at):
    """SIGKILL the Train worker once `step` steps are logged. The pid is found
    (by Ray's process title) before training gets there: a tiny model's steps are fast."""
    import psutil

    pids = []
    while not stop.is_set():
        if not pids:
            # only this process's own Ray (its raylet is our child): another test session's
            # Ray on the machine (pytest -n) has Train workers too
            pids = [p.pid for p in psutil.Process().children(recursive=True)
                    if any("ray::RayTrainWorker" in c for c in _cmdline(p))]
        elif metrics_file.exists():
            n = sum(1 for _ in open(metrics_file))
            if n >= step:
                os.kill(pids[0], signal.SIGKILL)
                killed_at.append(n)
                return
        time.sleep(0.01)


# 24 steps (3 epochs), checkpoints every 5: the uninterrupted run both restart tests compare to
LONG = ("trainer.max_steps=24", "trainer.checkpoint_every=5", "trainer.max_failures=2")


def test_killed_worker_resumes_from_checkpoint_and_reproduces_the_tail(tmp_path, shared_run, pairs_ds, tiny_model_dir,
                                                                        tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    common = LONG
    straight, _ = shared_run("straight", pairs_ds, tiny_model_dir, pad, *common)
    stop, killed_at = threading.Event(), []
    killer = threading.Thread(target=_kill_a_worker_after,
                              args=(tmp_path / "killed" / "metrics.jsonl", 7, stop, killed_at))
    killer.start()
    try:
        killed, _ = run(tmp_path, "killed", pairs_ds, tiny_model_dir, pad, *common)
    finally:
        stop.set()
        killer.join()
    steps = [json.loads(l)["step"] for l in open(tmp_path / "killed" / "metrics.jsonl")]
    assert killed_at and killed_at[0] < 24, "the kill was meant to land mid-training"
    assert steps.count(6) == 2, f"expected a restart from the step-5 checkpoint: {steps}"
    assert [r["step"] for r in killed] == list(range(1, 25))
    assert traj(killed, "loss")[5:] == pytest.approx(traj(straight, "loss")[5:], rel=1e-5, abs=1e-6)


def test_resumed_run_reproduces_the_tail(tmp_path, shared_run, pairs_ds, tiny_model_dir, tiny_tokenizer):
    """A stage run to step 4, then rerun asking for 8 steps, continues from its
    step-4 checkpoint (weights, optimizer, data position) and reproduces steps
    5-8 of an uninterrupted run (the constant LR makes the first 8 steps of the
    24-step run the same as an 8-step run's)."""
    pad = tiny_tokenizer.pad_token_id
    straight, _ = shared_run("straight", pairs_ds, tiny_model_dir, pad, *LONG)
    straight = straight[:8]
    first, _ = run(tmp_path, "cut", pairs_ds, tiny_model_dir, pad, "trainer.max_steps=4")
    assert len(first) == 4
    resumed, _ = run(tmp_path, "cut", pairs_ds, tiny_model_dir, pad, "trainer.max_steps=8")
    steps = [json.loads(l)["step"] for l in open(tmp_path / "cut" / "metrics.jsonl")]
    assert steps == list(range(1, 9))  # nothing redone, nothing skipped
    assert traj(resumed, "loss")[4:] == pytest.approx(traj(straight, "loss")[4:], rel=1e-5, abs=1e-6)
    assert traj(resumed, "loss")[4:] != pytest.approx(traj(straight, "loss")[:4], rel=1e-3)  # not a restart from 0


def test_lora_reference_is_base_with_adapters_off(tmp_path, pairs_ds, tiny_model_dir, tiny_tokenizer):
    rows, ckpt = run(tmp_path, "lora", pairs_ds, tiny_model_dir, tiny_tokenizer.pad_token_id, "trainer.lora_r=8",
                     "trainer.lr=3e-3")
    assert traj(rows, "loss")[0] == pytest.approx(0.693147, abs=1e-6)  # LoRA B starts at 0: policy == base
    assert traj(rows, "loss")[-1] < traj(rows, "loss")[0]
    assert (ckpt / "adapter.safetensors").exists()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(ckpt)  # merged weights, loadable as a plain model
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path, shared_run, pairs_ds, tiny_model_dir, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    plain, _ = shared_run("one", pairs_ds, tiny_model_dir, pad, "cluster.trainer.count=1", f"trainer.micro_batch_size={BATCH}")
    gc, _ = run(tmp_path, "gc", pairs_ds, tiny_model_dir, pad, "trainer.gradient_checkpointing=true")
    assert traj(gc, "loss") == pytest.approx(traj(plain, "loss"), rel=1e-5, abs=1e-6)


def test_offline_dpo_raises_held_out_preference_accuracy(tmp_path, ray_local, tiny_model_dir, tiny_tokenizer):
    """Synthetic pairs (judge's best vs worst of 4 demonstrations) on training
    prompts; accuracy measured on pairs from the 256 held-out prompts. Before
    training every margin is exactly 0 (accuracy 0); after, well above chance."""
    from transformers import AutoModelForCausalLM

    from raydpo.data.pipeline import read_pairs, tokenize
    from raydpo.train.evaluate import preference_accuracy

    train, held_out = style.split_prompts()
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in style.preference_records(train, 512, seed=5)))
    good, _ = read_pairs(str(path))
    ds = tokenize(good, str(tiny_model_dir), 48, 80).materialize()
    rows, ckpt = run(tmp_path, "offline", ds, tiny_model_dir, tiny_tokenizer.pad_token_id, "trainer.batch_size=32",
                     "trainer.micro_batch_size=32", "trainer.max_steps=0", "trainer.epochs=3", "trainer.lr=1e-3")
    eval_pairs = style.preference_records(held_out, 256, seed=6)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(ckpt)
    assert preference_accuracy(base, base, tiny_tokenizer, eval_pairs) == 0.0
    acc = preference_accuracy(policy, base, tiny_tokenizer, eval_pairs)
    print(f"held-out preference accuracy after offline DPO: {acc:.3f}")
    assert acc >= 0.75


def test_precomputed_reference_under_bf16_has_the_policys_precision(pairs_ds, tiny_model_dir, tiny_tokenizer):
    """model.dtype=bfloat16: the live reference runs under the policy's bf16 autocast, so the
    precomputed one must too; float32 log-probs would differ from it by more than bf16 noise."""
    from transformers import AutoModelForCausalLM

    from raydpo.data.collate import layout
    from raydpo.train.step import frozen_logps as reference_logps, precision
    from raydpo.train.reference import precompute_reference

    pad = tiny_tokenizer.pad_token_id
    rows = pairs_ds.limit(16).take_all()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    part = {k: [list(r[k]) for r in rows] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    mb = layout(True).collate(part, pad)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the scorer actor (1 CPU): the same kernels, the same rounding
    try:
        with precision(True, "cpu"):  # what PolicyTrainer's live reference computes under bf16
            live = torch.cat(reference_logps(model, mb))
        fp32 = torch.cat(reference_logps(model, mb))
    finally:
        torch.set_num_threads(threads)
    ds = pairs_ds.limit(16)
    got = {bf16: precompute_reference(ds, str(tiny_model_dir), pad, batch_size=16, micro_batch_size=16,
                                      bf16=bf16).take_all() for bf16 in (True, False)}
    pre = {k: torch.tensor([r["reference_chosen_logps"] for r in v] + [r["reference_rejected_logps"] for r in v])
           for k, v in got.items()}
    assert (live - fp32).abs().max() > 1e-3  # bf16 is visibly another precision here (1e-3..1e-2)
    assert torch.allclose(pre[True], live, atol=1e-4)
    assert torch.allclose(pre[False], fp32, atol=1e-4)


def test_reference_cache_is_written_atomically_and_keyed_by_the_tokenizer(ray_local, tmp_path, tiny_model_dir):
    import shutil

    from raydpo.data.pipeline import cached_dataset
    from raydpo.train.reference import reference_cache_key

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    key = reference_cache_key(model, data, 48, 80)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages[0]['content'] }}"  # a changed template re-tokenizes chat data
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert reference_cache_key(model, data, 48, 80) != key

    cache = tmp_path / "cache" / key
    cache.mkdir(parents=True)
    ray_local.data.from_items([{"x": -1}] * 3).write_parquet(str(cache))  # a write killed before _SUCCESS
    calls = []

    def compute():
        calls.append(1)
        return ray_local.data.from_items([{"x": i} for i in range(5)])

    ds, hit = cached_dataset(cache, compute)
    assert not hit and sorted(r["x"] for r in ds.take_all()) == list(range(5))
    again, hit = cached_dataset(cache, compute)
    assert hit and len(calls) == 1
    assert sorted(r["x"] for r in again.take_all()) == list(range(5))  # no duplicate or stale rows
    assert not list(cache.parent.glob("*.tmp-*"))


def test_warm_up_save_imports_what_the_first_hf_save_would(tmp_path, tiny_model_dir):
    """The online trainer's first checkpoint is on the loop's clock: `warm_up_save` at start-up
    leaves its first save nothing heavy to import (transformers' save has accelerate import
    DeepSpeed), in a fresh interpreter, and without it the same save does import DeepSpeed."""
    import subprocess
    import sys

    script = f"""
import sys
from transformers import AutoModelForCausalLM
from raydpo.train.learner import warm_up_save
model = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})
if sys.argv[1] == "warm":
    warm_up_save()
before = set(sys.modules)
model.save_pretrained(sys.argv[2])
print(sorted(m for m in set(sys.modules) - before if m.split(".")[0] == "deepspeed")[:3])
"""
    procs = {how: subprocess.Popen([sys.executable, "-c", script, how, str(tmp_path / how)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for how in ("warm", "cold")}  # side by side
    out = {}
    for how, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-2000:]
        out[how] = stdout.strip().splitlines()[-1]
    assert out["warm"] == "[]"
    assert out["cold"] != "[]"  # the premise: transformers' first save imports DeepSpeed
