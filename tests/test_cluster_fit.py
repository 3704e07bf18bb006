"""The start-up checks a job makes before anything can hang or land in the wrong place:
the roles that run together fit the cluster, and run_dir outlives the job."""

from pathlib import Path

import pytest

from raydpo.config import ConfigError, load_config
from raydpo.cluster import check_cluster_fits, outliving_path, role_needs

ROLES = ("trainer", "sampler", "judge", "policy")


def node(cpu, gpu=0.0, alive=True):
    return {"Alive": alive, "Resources": {"CPU": cpu, **({"GPU": gpu} if gpu else {})}}


def test_demo_roles_need_six_cpus_with_the_data_cpu():
    needs = role_needs(load_config(None, []), ROLES)
    assert needs == [("trainer", 1, 2.0, 0.0), ("sampler", 1, 1.0, 0.0), ("judge", 1, 0.5, 0.0), ("policy", 1, 1.0, 0.0)]
    check_cluster_fits(needs, [node(6)], data_cpus=1)  # cluster/local.sh's head on a 2-core machine
    with pytest.raises(ConfigError) as e:
        check_cluster_fits(needs, [node(2)], data_cpus=1)  # `ray start --head` on 2 cores, as the README had it
    msg = str(e.value)
    assert msg.startswith("the Ray cluster has 2 CPUs and 0 GPUs on 1 node(s)")
    assert ("need 5.5 CPUs (trainer 1 x 2 CPU, sampler 1 x 1 CPU, judge 1 x 0.5 CPU, policy 1 x 1 CPU, "
            "+ 1 for Ray Data tasks)") in msg
    assert "cluster.<role>.count" in msg and "--num-cpus" in msg and "cluster.check_resources=false" in msg


def test_every_role_must_fit_on_one_node_and_dead_nodes_do_not_count():
    needs = role_needs(load_config(None, ["cluster.trainer.cpus=8", "cluster.sampler.gpus=1"]), ("trainer", "sampler"))
    nodes = [node(4, gpu=1), node(4), node(16, alive=False)]  # 8 CPUs in all, but none holds 8
    with pytest.raises(ConfigError) as e:
        check_cluster_fits(needs, nodes)
    msg = str(e.value)
    assert "no node can hold one trainer (8 CPU)" in msg and "no node can hold one sampler" not in msg
    assert "need 9 CPUs" in msg and "on 2 node(s)" in msg
    check_cluster_fits(needs, [node(8), node(4, gpu=1)])  # one node each: fits


def test_gpus_are_counted():
    needs = role_needs(load_config(None, ["cluster.trainer.gpus=1", "cluster.trainer.count=2",
                                           "trainer.micro_batch_size=8"]), ("trainer",))
    with pytest.raises(ConfigError, match="they need 2 GPUs"):
        check_cluster_fits(needs, [node(8, gpu=1)])
    check_cluster_fits(needs, [node(8, gpu=2)])


def test_zero_count_roles_need_nothing():
    assert [r for r, *_ in role_needs(load_config(None, ["cluster.policy.count=0"]), ROLES)] == ["trainer", "sampler", "judge"]


def test_relative_run_dir_in_rays_working_dir_copy_is_refused(tmp_path):
    copy = tmp_path / "ray" / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy.mkdir(parents=True)
    with pytest.raises(ConfigError) as e:
        outliving_path("runs/demo", cwd=str(copy))
    assert f"resolves to {copy / 'runs' / 'demo'}" in str(e.value) and "run_dir=$PWD/runs/demo" in str(e.value)
    assert outliving_path(str(tmp_path / "runs"), cwd=str(copy)) == tmp_path / "runs"  # absolute: kept
    with pytest.raises(ConfigError, match="judge.model_path=rm resolves to"):
        outliving_path("rm", "judge.model_path", cwd=str(copy))
    assert outliving_path("runs/demo", cwd=str(tmp_path)) == tmp_path / "runs" / "demo"  # a plain checkout
    assert outliving_path("x") == Path.cwd() / "x"
