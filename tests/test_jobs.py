"""Job entrypoints as a user runs them: `python jobs/X.py key=value ...`."""

import json

from tests.helpers.proc import run_py

import pytest


def test_train_dpo_names_the_missing_key(tmp_path):
    r = run_py(["jobs/train_dpo.py", f"run_dir={tmp_path}"], timeout=120)
    assert r.returncode == 2
    assert "jobs/train_dpo.py needs a value for: data.train_path" in r.stderr


def test_bad_override_exits_2(tmp_path):
    r = run_py(["jobs/sft.py", f"run_dir={tmp_path}", "trainer.sft_step=3"], timeout=120)
    assert r.returncode == 2 and "did you mean 'trainer.sft_steps'" in r.stderr


@pytest.mark.slow
def test_sft_job_on_built_in_demonstrations(tmp_path):
    """With --verbose the workers' output reaches the console; Ray Train's placement-group
    cleaner among them used to log "Failed to query Ray Train Controller actor state" every
    second, because the state API was pointed at a refused port. It now has one to ask."""
    r = run_py(["jobs/sft.py", "--verbose", f"run_dir={tmp_path}", "trainer.sft_steps=30",
                "trainer.sft_batch_size=32", "cluster.num_cpus=2"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    console = r.stdout + r.stderr
    assert "RayTrainWorker" in console  # verbose: worker output is forwarded
    assert "State API may be temporarily unavailable" not in console
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


@pytest.mark.slow
def test_train_dpo_job_precomputes_caches_and_trains(tmp_path):
    """jobs/train_dpo.py end to end on a file with one malformed line: the bad record is
    counted and the rest kept, the reference pass (which tokenizes) runs once and is cached,
    DPO starts at ln 2 (policy == precomputed reference), and a second run on the same data
    reads the cache and finds the stage finished."""
    from raydpo.tasks import style

    data = tmp_path / "pairs.jsonl"
    lines = [json.dumps(r) for r in style.preference_records(style.split_prompts()[0], 40, seed=5)]
    lines.insert(7, '{"prompt": "no responses"}')
    data.write_text("\n".join(lines) + "\n")
    args = ["jobs/train_dpo.py", f"run_dir={tmp_path / 'run'}", f"data.train_path={data}", "trainer.batch_size=8",
            "trainer.micro_batch_size=8", "trainer.max_steps=3", "cluster.num_cpus=2"]
    r = run_py(args, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "good records: 40" in r.stdout and "bad records:  1" in r.stdout, r.stdout[-2000:]
    assert "reference log-probs: computed and cached" in r.stdout and "truncated: 0 prompts" in r.stdout
    assert "DPO done" in r.stdout
    # without --verbose the console is the job's own lines: no Ray Data plans, Ray start-up or worker output
    for internal in ("Execution plan of Dataset", "Started a local Ray instance", "RayTrainWorker", "TrainController"):
        assert internal not in r.stdout + r.stderr, internal
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [x["step"] for x in rows] == [1, 2, 3]
    assert abs(rows[0]["dpo/loss"] - 0.693147) < 1e-4  # precomputed reference == policy at step 0

    again = run_py(args, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reference log-probs: cached at" in again.stdout and "already finished at step 3" in again.stdout


@pytest.mark.slow
def test_too_few_pairs_for_one_batch_is_one_line_not_a_worker_traceback(tmp_path):
    """The check ran in the Ray Train workers, so the user got Ray's TrainingFailedError with
    the worker's ValueError inside; it is now made on the driver, before the trainer starts."""
    from raydpo.tasks import style

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in style.preference_records(style.split_prompts()[0], 5, seed=5)))
    r = run_py(["jobs/train_dpo.py", f"run_dir={tmp_path / 'run'}", f"data.train_path={data}", "trainer.batch_size=8",
                "trainer.micro_batch_size=8", "trainer.reference_logps=live", "cluster.num_cpus=2"], timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "5 training rows make no full global batch of 8" in r.stderr and "Traceback" not in r.stderr


def test_the_cli_maps_errors_to_exit_codes_in_one_place(tmp_path):
    """`raydpo data validate` exited 1 on a missing file (the jobs: 2) and `raydpo report`
    caught its own error; a cut metrics line in the middle of the file was a ValueError
    traceback (--resume reads the same file). Each is now a DataError: one line, exit 2."""
    r = run_py(["-m", "raydpo.cli", "data", "validate", str(tmp_path / "none.jsonl")], timeout=120)
    assert r.returncode == 2 and "none.jsonl: no such file or folder" in r.stderr and "Traceback" not in r.stderr
    r = run_py(["-m", "raydpo.cli", "report", str(tmp_path)], timeout=120)
    assert r.returncode == 2 and "no iterations recorded yet" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "online_metrics.jsonl").write_text('{"iteration": 0}\n{"iterat\n{"iteration": 1}\n')
    r = run_py(["-m", "raydpo.cli", "report", str(tmp_path)], timeout=120)
    assert r.returncode == 2 and "online_metrics.jsonl:2: not a JSON object" in r.stderr and "Traceback" not in r.stderr
