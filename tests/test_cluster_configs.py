"""cluster/: what can be checked without machines or Kubernetes (neither exists here).

The launcher YAML is validated against Ray's own cluster-config JSON schema; the
KubeRay manifests' entrypoints must name files and configs that exist and load;
every Serve application they declare must build with its args."""

import json
import shlex
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

from raydpo.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def test_launcher_yaml_matches_rays_schema():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert any("scripts/setup.sh" in c for c in cfg["setup_commands"])


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
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    for f in _entrypoint_files(job["spec"]["entrypoint"]):
        assert f.exists(), f
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__


def test_raycluster_shape():
    rc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert rc["kind"] == "RayCluster" and rc["spec"]["rayVersion"] == ray.__version__
    assert rc["spec"]["workerGroupSpecs"][0]["replicas"] >= 1


def test_rayservice_apps_build_with_their_args():
    svc = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
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
