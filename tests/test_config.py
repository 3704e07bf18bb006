"""Config: YAML + dotted overrides round-trip, and every class of bad config
gives one clear error that names the key."""

import pytest
import yaml

from raydpo.config import ConfigError, RunConfig
from raydpo.config_io import load_config, require, save_config
from tests.helpers.proc import run_py


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_validate():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.cluster.host == "127.0.0.1"  # servers bind to loopback by default
    assert cfg.model.trust_remote_code is False


def test_yaml_and_overrides_round_trip(tmp_path):
    p = write(tmp_path, 'seed: 3\ntrainer:\n  lr: 0.001\n  loss: ipo\nsampler:\n  stop: ["\\n"]\n')
    cfg = load_config(p, ["trainer.lr=1e-5", "cluster.sampler.count=3", "sampler.seed=null", "model.tiny.hidden_size=256"])
    assert cfg.seed == 3
    assert cfg.trainer.loss == "ipo"  # from YAML
    assert cfg.trainer.lr == pytest.approx(1e-5)  # override wins over YAML; "1e-5" coerced to float
    assert cfg.cluster.sampler.count == 3
    assert cfg.cluster.sampler.cpus == 1.0  # untouched sibling keeps its default
    assert cfg.sampler.seed is None
    assert cfg.sampler.stop == ["\n"]
    saved = save_config(cfg, tmp_path / "run")
    assert saved == tmp_path / "run" / "config.yaml"
    assert load_config(saved) == cfg  # the saved file reproduces the resolved config exactly


@pytest.mark.parametrize(
    "text, expected",
    [
        ("trainer:\n  bta: 0.2\n", "trainer.bta: unknown key (did you mean 'trainer.beta'?)"),
        ("trainr:\n  beta: 0.2\n", "trainr: unknown key (did you mean 'trainer'?)"),
        ("trainer:\n  batch_size: many\n", "trainer.batch_size: Input should be a valid integer"),
        ("trainer:\n  batch_size: 1.5\n", "trainer.batch_size: Input should be a valid integer"),
        ("trainer:\n  loss: dpo\n", "trainer.loss: unknown loss 'dpo'; known: sigmoid, robust, hinge, ipo, simpo"),
        ("judge:\n  kind: gpt\n", "judge.kind: unknown judge kind 'gpt'; known: rule, reward_model, llm"),
        ("trainer:\n  reference: live\n", "trainer.reference: renamed to trainer.reference_logps"),
        ("loop:\n  reference: previous\n", "loop.reference: renamed to loop.reference_policy"),
        ("trainer:\n  beta: -1\n", "trainer.beta: Input should be greater than 0"),
        ("trainer:\n  lr: null\n", "trainer.lr: Input should be a valid number"),
        ("trainer: 3\n", "trainer: Input should be a valid dictionary"),
    ],
)
def test_bad_yaml_values_name_the_key(tmp_path, text, expected):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert expected in str(e.value)
    assert "c.yaml" in str(e.value)  # and the file it came from


def test_all_problems_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "trainer:\n  bta: 1\n  batch_size: x\n"))
    assert "trainer.bta" in str(e.value) and "trainer.batch_size" in str(e.value)


def test_bad_yaml_syntax_gives_line_and_column(tmp_path):
    p = write(tmp_path, "seed: 1\ntrainer:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad YAML at .*c\.yaml:4:1"):
        load_config(p)


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.lrr=1", "unknown key trainer.lrr (did you mean 'trainer.lr'?)"),
        ("trainer.lr", "must look like section.key=value"),
        ("trainer..lr=1", "empty key"),
        ("trainer.lr.x=1", "trainer.lr is a value, not a section"),
        ("trainer.lr=fast", "trainer.lr: Input should be a valid number"),
    ],
)
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert expected in str(e.value)


def test_require_names_missing_values():
    cfg = load_config(None, ["data.train_path=pairs.jsonl"])
    require(cfg, "data.train_path", by="train_dpo")  # present: no error
    with pytest.raises(ConfigError, match=r"train_dpo needs a value for: data\.eval_path, model\.path"):
        require(cfg, "data.eval_path", "model.path", by="train_dpo")


def test_cli_reports_config_errors_without_traceback(tmp_path):
    r = run_py(["-m", "raydpo.cli", "config", "show", "trainer.bta=1"], timeout=60)
    assert r.returncode == 2
    assert "raydpo: error:" in r.stderr and "did you mean 'trainer.beta'" in r.stderr
    assert "Traceback" not in r.stderr
    ok = run_py(["-m", "raydpo.cli", "config", "show", "trainer.beta=0.5"], timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["trainer"]["beta"] == 0.5


def test_batch_sizes_must_divide_across_workers():
    with pytest.raises(ConfigError, match=r"trainer.batch_size \(16\) must be a multiple of trainer.micro_batch_size \(8\) x cluster.trainer.count \(3\)"):
        load_config(None, ["trainer.micro_batch_size=8", "cluster.trainer.count=3"])
    with pytest.raises(ConfigError, match=r"<root>: trainer.sft_batch_size \(64\) must be a multiple of cluster.trainer.count \(3\)$"):
        load_config(None, ["trainer.batch_size=48", "trainer.micro_batch_size=8", "cluster.trainer.count=3"])
    cfg = load_config(None, ["trainer.batch_size=48", "trainer.micro_batch_size=8", "cluster.trainer.count=3",
                             "trainer.sft_batch_size=48"])
    assert cfg.trainer.batch_size == 48


def test_serve_roles_scale_fixed_or_autoscaled():
    cfg = load_config(None, ["cluster.judge.count=2"])
    assert cfg.cluster.judge.serve_scaling() == {"num_replicas": 2}
    cfg = load_config(None, ["cluster.policy.count=1", "cluster.policy.max_count=4"])
    assert cfg.cluster.policy.serve_scaling(8) == {
        "autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}}


def test_a_role_given_in_part_keeps_that_roles_defaults(tmp_path):
    """`cluster.trainer.count=4` (the README's scale-out line) used to reset each worker
    to Resources' class default of 1 CPU instead of the trainer's 2, and the judge's
    0.5 CPU to 1, silently."""
    cfg = load_config(None, ["cluster.trainer.count=4", "trainer.micro_batch_size=4", "cluster.judge.count=2"])
    assert (cfg.cluster.trainer.count, cfg.cluster.trainer.cpus) == (4, 2.0)
    assert (cfg.cluster.judge.count, cfg.cluster.judge.cpus) == (2, 0.5)
    p = tmp_path / "c.yaml"
    p.write_text("cluster:\n  trainer: {gpus: 1}\n  judge: {cpus: 3}\n")
    cfg = load_config(p)
    assert (cfg.cluster.trainer.count, cfg.cluster.trainer.cpus, cfg.cluster.trainer.gpus) == (1, 2.0, 1.0)
    assert cfg.cluster.judge.cpus == 3.0  # what is given wins
    assert load_config(None).cluster.trainer.cpus == 2.0


def test_a_renamed_key_on_the_command_line_names_its_new_name():
    with pytest.raises(ConfigError, match=r"loop.reference was renamed to loop.reference_policy"):
        load_config(None, ["loop.reference=previous"])


def test_a_saved_config_of_an_older_run_is_read_under_the_new_names(tmp_path):
    """--resume of a run started before the rename: its config.yaml keeps the old keys."""
    from raydpo.config_io import read_saved_config

    (tmp_path / "config.yaml").write_text("trainer:\n  reference: live\nloop:\n  reference: previous\n")
    saved = read_saved_config(tmp_path)
    assert saved["trainer"]["reference_logps"] == "live" and saved["loop"]["reference_policy"] == "previous"


def test_a_malformed_saved_config_is_named_not_a_traceback(tmp_path):
    from raydpo.config_io import read_saved_config

    (tmp_path / "config.yaml").write_text("trainer: 3\n")
    with pytest.raises(ConfigError, match=r"trainer: Input should be a valid dictionary"):
        read_saved_config(tmp_path)


def test_nccl_weight_transport_is_refused_where_it_cannot_work():
    """sampler.weight_transport=nccl is GPU only (never run here): refused by name without
    GPUs on both sides, beside the overlapped loop, and with LoRA."""
    with pytest.raises(ConfigError, match="nccl needs GPUs on both sides"):
        load_config(None, ["sampler.weight_transport=nccl"])
    gpus = ["sampler.weight_transport=nccl", "cluster.trainer.gpus=1", "cluster.sampler.gpus=1"]
    assert load_config(None, gpus).sampler.weight_transport == "nccl"
    with pytest.raises(ConfigError, match="needs loop.max_staleness=0"):
        load_config(None, [*gpus, "loop.max_staleness=1"])
    with pytest.raises(ConfigError, match="trainer.lora_r=0"):
        load_config(None, [*gpus, "trainer.lora_r=4"])
