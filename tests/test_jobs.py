"""Job entrypoints as a user runs them: `python jobs/X.py key=value ...`."""

import json

from tests.helpers.proc import run_py


def test_train_dpo_names_the_missing_key(tmp_path):
    r = run_py(["jobs/train_dpo.py", f"run_dir={tmp_path}"], timeout=120)
    assert r.returncode == 2
    assert "jobs/train_dpo.py needs a value for: data.train_path" in r.stderr


def test_bad_override_exits_2(tmp_path):
    r = run_py(["jobs/sft.py", f"run_dir={tmp_path}", "trainer.sft_step=3"], timeout=120)
    assert r.returncode == 2 and "did you mean 'trainer.sft_steps'" in r.stderr


def test_sft_job_on_built_in_demonstrations(tmp_path):
    r = run_py(["jobs/sft.py", f"run_dir={tmp_path}", "trainer.sft_steps=30", "trainer.sft_batch_size=32",
                "cluster.num_cpus=2"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SFT done" in r.stdout and "final loss" in r.stdout
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    losses = [x["sft/loss"] for x in rows]
    assert len(losses) == 30 and losses[-1] < 0.7 * losses[0]  # it learns the demonstrations
    ckpt = tmp_path / "ray_train" / "sft" / "sft-step-000030"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "tokenizer.json").exists()
    assert (tmp_path / "config.yaml").exists()  # resolved config saved with the run


def test_missing_data_file_is_named(tmp_path):
    r = run_py(["jobs/train_dpo.py", f"run_dir={tmp_path}", "data.train_path=/nonexistent/pairs.jsonl",
                "cluster.num_cpus=2"], timeout=300)
    assert r.returncode == 2 and "/nonexistent/pairs.jsonl: no such file or folder" in r.stderr
    assert "Traceback" not in r.stderr
