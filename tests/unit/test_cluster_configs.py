"""Cluster configs (cluster/) cannot start here: check their schema, and that the run they are for fits them."""

import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import ray
import yaml
from conftest import ROOT

from plad_ray.cluster import check_resources
from plad_ray.config import load_config

CLUSTER = ROOT / "cluster"
RAY_VERSION = next(
    re.search(r"==([\d.]+)", d).group(1)
    for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    if d.startswith("ray[")
)


def test_aws_launcher_config_matches_rays_schema_and_fits_the_llama_run():
    config = yaml.safe_load((CLUSTER / "aws-2x-p4de-8xa100.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["GPU"] == 0
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    gpus = sum(t["min_workers"] * t["resources"]["GPU"] for t in workers)
    cpus = sum(t["min_workers"] * t["resources"]["CPU"] for t in workers)
    assert gpus == 16
    run = load_config(str(ROOT / "configs" / "llama2-13b-to-7b-tldr.yaml"))
    nodes = [
        {"CPU": float(t["resources"]["CPU"]), "GPU": float(t["resources"]["GPU"])}
        for t in workers
        for _ in range(t["min_workers"])
    ]
    check_resources(run, {"CPU": float(cpus), "GPU": float(gpus)}, nodes=nodes)  # each TP-2 replica on one node
    assert "/mnt/shared" in " ".join(config["initialization_commands"]) and run.output_dir.startswith("/mnt/shared")


def kuberay_nodes(spec: dict) -> list[dict]:
    """The resources of each worker pod."""
    nodes = []
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        nodes += [{"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}] * group["replicas"]
    return nodes


def kuberay_resources(spec: dict) -> dict:
    nodes = kuberay_nodes(spec)
    return {"CPU": sum(n["CPU"] for n in nodes), "GPU": sum(n["GPU"] for n in nodes)}


def check_raycluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == RAY_VERSION == ray.__version__
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        container = pod["containers"][0]
        assert container["image"].endswith("plad-ray:0.1.0-gpu")
        assert container["resources"]["limits"] == container["resources"]["requests"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert mounts["shared"] == "/mnt/shared" and "persistentVolumeClaim" in volumes["shared"]
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_kuberay_raycluster_and_rayjob():
    cluster = yaml.safe_load((CLUSTER / "kuberay-1x8gpu-raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay-1x8gpu-rayjob.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    check_raycluster_spec(cluster["spec"])
    check_raycluster_spec(job["spec"]["rayClusterSpec"])
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    # The entrypoint runs a shipped config, and that run fits the cluster's GPUs and CPUs.
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[words.index("-m") + 1] == "jobs.distill"
    run = load_config(str(ROOT / words[words.index("--config") + 1]))
    assert run.cluster.use_gpu and run.output_dir.startswith("/mnt/shared")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        resources = kuberay_resources(spec)
        assert resources == {"CPU": 64.0, "GPU": 8.0}
        check_resources(run, resources, nodes=kuberay_nodes(spec))


def test_dockerfile_builds_on_the_pinned_ray_with_the_gpu_and_tracking_extras():
    lines = [line.strip() for line in (CLUSTER / "Dockerfile.gpu").read_text().splitlines()]
    assert f"FROM rayproject/ray:{RAY_VERSION}-py311-gpu" in lines
    assert 'RUN pip install --no-cache-dir -e ".[gpu,tracking]"' in lines  # trackers: MLflow and W&B clients
    for copied in ("plad_ray", "jobs", "configs"):
        assert any(line.startswith("COPY") and f" {copied} " in line + " " for line in lines), copied
