"""The start-up checks a job makes before anything can hang or land in the wrong place:
the roles that run together fit the cluster, and run_dir outlives the job."""

from pathlib import Path

import pytest

from raydpo.config import ConfigError
from raydpo.config_io import load_config
from raydpo.cluster import RoleNeed, check_cluster_fits, outliving_path, role_needs

ROLES = ("trainer", "sampler", "judge", "policy")


def node(cpu, gpu=0.0, alive=True, **custom):
    return {"Alive": alive, "Resources": {"CPU": cpu, **({"GPU": gpu} if gpu else {}), **custom}}


def test_demo_roles_need_six_cpus_with_the_data_cpu():
    needs = role_needs(load_config(None, []), ROLES)
    assert needs == [RoleNeed("trainer", 1, 2.0, 0.0, {}), RoleNeed("sampler", 1, 1.0, 0.0, {}),
                     RoleNeed("judge", 1, 0.5, 0.0, {}), RoleNeed("policy", 1, 1.0, 0.0, {})]
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


PLACED = ["cluster.trainer.resources={trainer_node: 1}", "cluster.sampler.resources={sampler_node: 1}",
          "cluster.judge.resources={head_node: 0.5}", "cluster.policy.resources={head_node: 0.5}"]


def test_roles_placed_by_custom_resources_fit_the_nodes_that_have_them():
    needs = role_needs(load_config(None, PLACED), ROLES)
    assert needs[0] == RoleNeed("trainer", 1, 2.0, 0.0, {"trainer_node": 1.0})
    cluster = [node(3, head_node=1), node(2, trainer_node=1), node(1, sampler_node=1)]  # bench/multinode.py's
    check_cluster_fits(needs, cluster, data_cpus=1)


def test_a_custom_resource_no_node_has_is_named_with_the_ray_start_flag():
    needs = role_needs(load_config(None, PLACED), ROLES)
    with pytest.raises(ConfigError) as e:
        check_cluster_fits(needs, [node(3, head_node=1), node(2, trainer_node=1), node(1)], data_cpus=1)
    msg = str(e.value)
    assert "no node has the custom resource 'sampler_node' that cluster.sampler.resources asks for" in msg
    assert """--resources='{"sampler_node": N}'""" in msg
    assert "trainer_node" not in msg.split("but ", 1)[1].split(". ")[0]  # the trainer's node is fine


def test_the_nodes_with_a_custom_resource_must_hold_the_roles_it_places():
    needs = role_needs(load_config(None, PLACED), ROLES)
    # the trainer's node has 1 CPU for a 2-CPU worker, though the cluster has 7 CPUs in all
    with pytest.raises(ConfigError) as e:
        check_cluster_fits(needs, [node(4, head_node=1), node(1, trainer_node=1), node(2, sampler_node=1)])
    assert "no node can hold one trainer (2 CPU + 1 trainer_node)" in str(e.value)
    # judge and policy each fit the head alone, but not together: 1.5 CPUs on a 1-CPU head
    with pytest.raises(ConfigError) as e:
        check_cluster_fits(needs, [node(1, head_node=1), node(2, trainer_node=1), node(1, sampler_node=1), node(4)])
    assert "judge and policy need 1.5 CPUs on the nodes with 'head_node', which have 1" in str(e.value)
    # two trainer workers need 2 trainer_node where there is one
    two = role_needs(load_config(None, PLACED + ["cluster.trainer.count=2", "trainer.micro_batch_size=8"]), ("trainer",))
    with pytest.raises(ConfigError, match="trainer need 2 trainer_node on the nodes with 'trainer_node', which have 1"):
        check_cluster_fits(two, [node(8, trainer_node=1)])
    check_cluster_fits(two, [node(2, trainer_node=1), node(2, trainer_node=1)])


def test_custom_resources_refuse_built_in_names_and_non_positive_amounts():
    with pytest.raises(ConfigError, match="cluster.trainer.resources: 'CPU' is not a custom resource"):
        load_config(None, ["cluster.trainer.resources={CPU: 1}"])
    with pytest.raises(ConfigError, match="cluster.sampler.resources: sampler_node: 0.0 must be > 0"):
        load_config(None, ["cluster.sampler.resources={sampler_node: 0}"])


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


def test_serve_replicas_take_their_placement_from_app_args():
    from raydpo.http import replica_options

    assert replica_options({}, 0.5) == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert replica_options({"num_cpus": 1, "resources": {"head_node": 0.5}}, 0.5) == {
        "num_cpus": 1.0, "num_gpus": 0.0, "resources": {"head_node": 0.5}}
    with pytest.raises(ValueError, match="args.resources must map custom resource names to amounts"):
        replica_options({"resources": ["head_node"]}, 1)


@pytest.mark.slow
def test_a_local_ray_holding_many_role_processes_keeps_rays_worker_count_warning_off_the_console():
    """On 2 CPUs the raylet printed "8 PYTHON worker processes have been started ... 4x the
    maximum expected startup concurrency" on every demo's console: an online run holds a
    process per role replica, most of them 0-CPU actors. 20 such actors must not print it."""
    import subprocess
    import sys

    script = ("import ray\n"
              "from raydpo.cluster import start_local_ray\n"
              "start_local_ray(num_cpus=2, log_to_driver=False)\n"
              "@ray.remote(num_cpus=0)\n"
              "class Role:\n"
              "    def ping(self): return 1\n"
              "roles = [Role.remote() for _ in range(20)]\n"
              "print('up', sum(ray.get([r.ping.remote() for r in roles])), flush=True)\n"
              "import time; time.sleep(2)\n"  # the raylet's warning reaches the driver within ~1 s
              "ray.shutdown()\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "up 20" in out.stdout
    assert "worker processes have been started" not in out.stdout + out.stderr


def test_free_ports_come_from_outside_the_ranges_the_kernel_and_ray_hand_out():
    """A port chosen before its server binds it (the dashboard binds seconds after the GCS
    starts) must not be one the kernel may meanwhile give to another process's connection
    or port-0 server: a suite once failed with "Failed to bind to 127.0.0.1:43379 because
    it's already occupied" when the kernel's own pick was taken in that gap. A seeded
    `random` must not make parallel processes choose alike."""
    import random
    import socket

    from raydpo.cluster import _ephemeral_ports, free_port

    low, _ = _ephemeral_ports()
    if low <= 20001:
        pytest.skip(f"this host's ephemeral ports start at {low}: free_port falls back to the kernel's pick")
    ports = []
    for _ in range(20):
        random.seed(0)
        ports.append(free_port())
    assert all(20000 <= p < low for p in ports), ports
    assert len(set(ports)) == len(ports), ports  # never one port twice in a process
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))
