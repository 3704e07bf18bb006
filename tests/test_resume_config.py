"""--resume continues a run only under the config it was started with, up to harmless keys;
a refused run keeps its own config.yaml."""

import json

import pytest

from raydpo.config_io import load_config, read_saved_config, save_config
from raydpo.online.loop import main
from raydpo.report import METRICS_FILE


def _started_run(tmp_path, *overrides):
    run_dir = tmp_path / "run"
    cfg = load_config(None, [f"run_dir={run_dir}", *overrides])
    save_config(cfg, run_dir)
    (run_dir / METRICS_FILE).write_text(json.dumps({"iteration": 0}) + "\n")
    return run_dir


def test_resume_refuses_a_change_to_what_is_sampled_and_names_the_key(tmp_path, capsys):
    run_dir = _started_run(tmp_path)
    before = (run_dir / "config.yaml").read_text()
    for key, value in [("sampler.samples_per_prompt", 8), ("loop.prompts_per_iteration", 32), ("seed", 7),
                       ("loop.chunk_prompts", 8), ("judge.rule", "my.module:score"), ("model.tiny.hidden_size", 64),
                       ("cluster.trainer.count", 2)]:
        extra = ["trainer.micro_batch_size=8"] if key == "cluster.trainer.count" else []  # a valid config
        assert main([f"run_dir={run_dir}", f"{key}={value}", *extra, "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"{key}:" in err and "Resume with the saved values" in err, err
        assert (run_dir / "config.yaml").read_text() == before  # the run's own config is untouched


def test_a_rerun_without_resume_is_refused_before_the_config_is_overwritten(tmp_path, capsys):
    run_dir = _started_run(tmp_path)
    assert main([f"run_dir={run_dir}", "seed=5"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert read_saved_config(run_dir)["seed"] == 0
    # killed during SFT: no metrics yet, but checkpoints a rerun would silently continue
    (run_dir / METRICS_FILE).unlink()
    (run_dir / "ray_train" / "sft").mkdir(parents=True)
    assert main([f"run_dir={run_dir}", "seed=5"]) == 2
    assert "pass --resume" in capsys.readouterr().err and read_saved_config(run_dir)["seed"] == 0


def test_keys_a_saved_config_predates_count_as_their_default(tmp_path):
    import yaml

    from raydpo.online.resume import check_run_dir

    run_dir = _started_run(tmp_path)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["trainer"]["stall_timeout_s"], saved["loop"]["truncated"]  # written by an older raydpo
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    check_run_dir(load_config(None, [f"run_dir={run_dir}"]), resume=True)  # no error


def test_resume_allows_more_iterations_and_other_resources():
    from raydpo.online.resume import RESUME_MAY_CHANGE, changed_keys

    a = load_config(None, []).model_dump(mode="json")
    b = load_config(None, ["loop.iterations=20", "cluster.sampler.count=2", "sampler.request_timeout_s=900",
                           "sampler.start_timeout_s=900", "cluster.sampler.resources={sampler_node: 1}",
                           "judge.call_timeout_s=0"]).model_dump(mode="json")
    assert set(changed_keys(a, b)) == {"loop.iterations", "cluster.sampler.count", "sampler.request_timeout_s",
                                       "sampler.start_timeout_s", "cluster.sampler.resources.sampler_node",
                                       "judge.call_timeout_s"}
    assert all(k.startswith(RESUME_MAY_CHANGE) for k in changed_keys(a, b))


def test_resume_may_fix_how_a_remote_judge_is_reached_but_not_what_it_is_asked(tmp_path):
    """The breaker's message says: fix the endpoint (or the retries), then --resume."""
    from raydpo.errors import ConfigError
    from raydpo.online.resume import check_run_dir

    judge = ["judge.kind=openai", "judge.remote.base_url=http://127.0.0.1:9/v1", "judge.remote.model=m"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(load_config(None, [f"run_dir={run_dir}", *judge]), run_dir)
    (run_dir / "online_metrics.jsonl").write_text('{"iteration": 0}\n')
    fixed = ["judge.remote.base_url=http://127.0.0.1:10/v1", "judge.remote.max_retries=20", "judge.remote.timeout_s=5",
             "judge.remote.breaker_failures=50", "judge.remote.requests_per_minute=60",
             "judge.remote.price_prompt_per_1k=0.1"]
    check_run_dir(load_config(None, [f"run_dir={run_dir}", *judge, *fixed]), resume=True)  # no error
    for other in ("judge.remote.model=other", "judge.remote.api=completions", "judge.max_new_tokens=3"):
        with pytest.raises(ConfigError, match=other.split("=")[0]):
            check_run_dir(load_config(None, [f"run_dir={run_dir}", *judge, other]), resume=True)
