"""cluster/: what can be checked without machines or Kubernetes (neither exists here).

The launcher YAML is validated against Ray's own cluster-config JSON schema, and the
KubeRay manifests against KubeRay's CRD schemas (vendored in tests/data/kuberay/).
Their entrypoints must name files and configs that exist and load, every Serve
application they declare must build with its args, and the CPUs and GPUs that the
raydpo configs ask for must fit what the manifests provide."""

import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

from raydpo.config import ConfigError
from raydpo.config_io import load_config
from raydpo.cluster import RoleNeed, check_cluster_fits, role_needs

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
CRDS = Path(__file__).parent / "data" / "kuberay"
LOOP_ROLES = ("trainer", "sampler", "judge", "policy")
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-1.4 MB of YAML


def manifest(name: str) -> dict:
    return yaml.load((KUBERAY / name).read_text(), Loader=Loader)


def crd_schema(plural: str) -> dict:
    crd = yaml.load((CRDS / f"ray.io_{plural}.yaml").read_text(), Loader=Loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("name,plural", [("raycluster.yaml", "rayclusters"), ("rayjob.yaml", "rayjobs"),
                                         ("rayservice.yaml", "rayservices")])
def test_kuberay_manifests_match_the_crd_schemas(name, plural):
    m = manifest(name)
    jsonschema.validate(m, crd_schema(plural))
    spec = cluster_spec(m)
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}  # token authentication on for a fresh cluster
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        for c in pod["containers"]:
            assert not c["image"].endswith(":latest") and ":" in c["image"], c["image"]  # :latest is always pulled
            assert c["imagePullPolicy"] == "IfNotPresent"
            for env in c.get("env", []):  # Secrets are optional: without them the apps need no key
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                assert ref is None or ref.get("optional") is True, env
            mounts = {v["name"] for v in c.get("volumeMounts", [])}
            assert mounts == {v["name"] for v in pod.get("volumes", [])} == {"shared"}
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        assert claims == {pvc()["metadata"]["name"]}
    autoscaled = any(g["minReplicas"] != g["maxReplicas"] for g in spec["workerGroupSpecs"])
    assert spec.get("enableInTreeAutoscaling", False) == autoscaled  # min/max do nothing without it


def pvc() -> dict:
    return manifest("pvc.yaml")


def test_the_shared_volume_is_defined_and_read_write_many():
    claim = pvc()
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]


def cluster_spec(m: dict) -> dict:
    return {"RayCluster": lambda: m["spec"], "RayJob": lambda: m["spec"]["rayClusterSpec"],
            "RayService": lambda: m["spec"]["rayClusterConfig"]}[m["kind"]]()


def nodes(spec: dict, at: str) -> list[dict]:
    """ray.nodes()-shaped records for the pods, each worker group at `at` ('replicas',
    'minReplicas' or 'maxReplicas'). A pod's Ray resources: rayStartParams num-cpus /
    num-gpus, else its container limits (what KubeRay passes to `ray start`)."""
    def resources(group):
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        start = group.get("rayStartParams", {})
        return {"CPU": float(start.get("num-cpus", limits.get("cpu", 0))),
                "GPU": float(start.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}

    out = [{"Alive": True, "Resources": resources(spec["headGroupSpec"])}]
    for g in spec["workerGroupSpecs"]:
        out += [{"Alive": True, "Resources": resources(g)}] * int(g[at])
    return out


def entrypoint_config(entrypoint: str):
    args = shlex.split(entrypoint)
    config = args[args.index("--config") + 1] if "--config" in args else None
    return load_config(str(REPO / config) if config else None, [a for a in args if "=" in a and not a.startswith("-")])


def test_sizing_the_configs_fit_the_manifests():
    job = manifest("rayjob.yaml")
    cfg = entrypoint_config(job["spec"]["entrypoint"])
    assert cfg.cluster.host == "0.0.0.0"  # reachable through the head's Service inside the pod network
    check_cluster_fits(role_needs(cfg, LOOP_ROLES), nodes(job["spec"]["rayClusterSpec"], "replicas"), data_cpus=1)
    rc = manifest("raycluster.yaml")["spec"]
    check_cluster_fits(role_needs(load_config(str(CLUSTER / "online_cluster.yaml")), LOOP_ROLES),
                       nodes(rc, "replicas"), data_cpus=1)
    gpu = load_config(str(CLUSTER / "online_gpu.yaml"))
    check_cluster_fits(role_needs(gpu, LOOP_ROLES), nodes(rc, "maxReplicas"), data_cpus=1)  # GPU pods autoscaled
    with pytest.raises(ConfigError):  # and the check can fail: the GPU config on the CPU pods alone
        check_cluster_fits(role_needs(gpu, LOOP_ROLES), nodes(rc, "replicas"), data_cpus=1)


def test_sizing_the_rayservice_apps_fit_their_workers():
    svc = manifest("rayservice.yaml")
    apps = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    spec = svc["spec"]["rayClusterConfig"]
    for at in ("minReplicas", "maxReplicas"):
        needs = []
        for app in apps:
            a = app["args"]
            scale = a.get("autoscaling")
            count = (scale["min_replicas"] if at == "minReplicas" else scale["max_replicas"]) if scale \
                else a.get("num_replicas", 1)
            needs.append(RoleNeed(app["name"], count, float(a.get("num_cpus", 1)), float(a.get("num_gpus", 0)),
                                  dict(a.get("resources", {}))))
        check_cluster_fits(needs, nodes(spec, at))
    policy = next(a["args"] for a in apps if a["name"] == "policy")
    mounted = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"]
    assert policy["model_path"].startswith(mounted + "/")  # the checkpoint is on the shared volume


def test_launcher_yaml_matches_rays_schema_and_starts_ray_from_the_venv():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert any("scripts/setup.sh" in c and "PYTHON=python3.11" in c for c in cfg["setup_commands"])
    venv = "/home/ubuntu/raydpo/.venv/bin"
    assert venv.rsplit("/.venv", 1)[0] in cfg["file_mounts"]
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        # `ray` and a job's `python` resolve in the venv; token authentication on every node
        assert cmd.startswith(f"export PATH={venv}:$PATH RAY_AUTH_MODE=token && ray "), cmd
    head = next(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head  # the job API is reached through `ray dashboard` (SSH)
    assert any(k.endswith(".ray/auth_token") for k in cfg["file_mounts"])


def test_raydpo_cluster_configs_load():
    for name in ("online_cluster.yaml", "online_gpu.yaml"):
        cfg = load_config(str(CLUSTER / name))
        assert cfg.cluster.host == "127.0.0.1" or name == "online_gpu.yaml"
    gpu = load_config(str(CLUSTER / "online_gpu.yaml"))
    assert gpu.model.dtype == "bfloat16" and gpu.cluster.trainer.gpus == 1


def _entrypoint_files(entrypoint: str) -> list[Path]:
    args = shlex.split(entrypoint)
    assert args[0] == "python"
    files = [REPO / args[1]]
    if "--config" in args:
        files.append(REPO / args[args.index("--config") + 1])
    return files


def test_rayjob_entrypoint_names_existing_files():
    job = manifest("rayjob.yaml")
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    for f in _entrypoint_files(job["spec"]["entrypoint"]):
        assert f.exists(), f
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__


def test_rayservice_apps_build_with_their_args():
    svc = manifest("rayservice.yaml")
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    import importlib

    for app in serve_cfg["applications"]:
        module, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attr)
        built = builder(app.get("args", {}))
        assert type(built).__name__ == "Application", app["name"]


def test_serve_yaml_apps_build_and_bind_to_loopback():
    import importlib

    for path in sorted((REPO / "serve").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        assert cfg["http_options"]["host"] == "127.0.0.1", path
        for app in cfg["applications"]:
            module, _, attr = app["import_path"].partition(":")
            built = getattr(importlib.import_module(module), attr)(app.get("args", {}))
            assert type(built).__name__ == "Application", (path, app["name"])


def test_serve_apps_refuse_relative_model_paths():
    """A relative path means another folder in each replica's working directory."""
    from raydpo.judge.apps import build_app as judge_app
    from raydpo.judge.llm import build_app as llm_judge_app
    from raydpo.policy.app import build_app as policy_app

    for build, args in [(policy_app, {"model_path": "runs/demo/x"}), (llm_judge_app, {"model_path": "judge"}),
                        (judge_app, {"reward_model": "runs/rm"})]:
        with pytest.raises(ValueError, match="is relative; give an absolute path"):
            build(args)
