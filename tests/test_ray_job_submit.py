"""The cluster path users take, on one machine: `ray start --head`, a second node with
`ray start --address`, then `ray job submit ... jobs.distill`. Ray's own state API must
show the work ran on both nodes."""

import json
import re
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT
from ray_head import RayHead

pytestmark = pytest.mark.integration


@pytest.fixture
def two_nodes():
    cluster = RayHead(num_cpus=2)
    cluster.add_node(num_cpus=2)
    yield cluster
    cluster.stop()


def state(cluster: RayHead, kind: str) -> list[dict]:
    listed = cluster.job_cli("list", kind, "--format", "json", "--detail", "--limit", "10000")
    assert listed.returncode == 0, listed.stderr[-2000:]
    return json.loads(listed.stdout)


def test_distill_through_ray_job_submit_on_two_nodes(two_nodes, tiny_models, tmp_path):
    nodes = {n["node_id"] for n in state(two_nodes, "nodes") if n["state"] == "ALIVE"}
    assert len(nodes) == 2
    # The config's relative output_dir (runs/tiny-cpu), as the README's command gives it: under the job it
    # goes under cluster.storage, not into Ray's temporary copy of the working dir.
    out = tmp_path / "runs" / "tiny-cpu"
    submit = two_nodes.job(
        "submit", "--working-dir", str(ROOT), "--",
        "python", "-m", "jobs.distill", "--config", "configs/tiny-cpu.yaml", "--set", f"cluster.storage={tmp_path}",
        "--set", "data.max_prompts=96", "--set", "train.num_epochs=1", "--set", "train.placement_strategy=SPREAD",
        "--set", "eval.initial_student=false", "--debug",
    )
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
    assert "succeeded" in (submit.stdout + submit.stderr)
    assert "SUCCEEDED" in two_nodes.job("list").stdout
    # The job joined the cluster it was given, not a local one of its own ...
    assert "joined Ray cluster" in submit.stdout
    # ... and ran there: one trainer rank per node (SPREAD), engines and the rest across both.
    # Engines: teacher, student, and the evaluation's trained student (no initial-student one).
    actors = state(two_nodes, "actors")
    trainers = [a["node_id"] for a in actors if a["class_name"] == "RayTrainWorker"]
    engines = [a["node_id"] for a in actors if "vLLMEngineStageUDF" in a["class_name"]]
    assert len(trainers) == 2 and set(trainers) == nodes, (trainers, nodes)
    assert len(engines) == 3 and {a["node_id"] for a in actors if a["node_id"]} == nodes
    # The outputs' absolute location, said at the start and at the end ...
    assert submit.stdout.count(f"outputs: {out}\n") == 2, submit.stdout[-3000:]
    # ... where they outlive the job's cluster: pairs, checkpoint, report, summary.
    two_nodes.stop()
    assert not list(Path(two_nodes.temp_dir).glob("session_*/runtime_resources/working_dir_files/*/runs"))
    from plad_ray.data import parquet

    assert parquet.read_table(str(out / "pairs")).num_rows == 96 * 2
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["pairs"] == 96 * 2 and report["steps"] > 0
    assert (out / "student" / "model.safetensors").is_file() and (out / "summary.md").is_file()
    # The evaluation ran after training, in the same job (its driver's working directory is
    # Ray's package copy, which Ray may replace meanwhile: paths were fixed at config load).
    evaluation = json.loads((out / "eval" / "report.json").read_text())
    assert set(evaluation["models"]) == {"teacher (cached outputs)", "trained student"}
    assert evaluation["models"]["trained student"]["prompts"] == report["evaluation"]["models"]["trained student"]["prompts"] > 0


def test_local_output_dir_that_a_node_cannot_see_is_refused(tiny_models, tmp_path):
    """On a multi-node cluster, a local output_dir that another node does not see (no shared mount) stops
    the run with one line naming output_dir, before anything is written."""
    shared = tmp_path / "not-shared"
    shared.mkdir()
    cluster = RayHead(num_cpus=2)
    try:
        cluster.add_node(num_cpus=1, hide=str(shared))
        run = subprocess.run(
            [PYTHON, "-m", "jobs.generate_pairs", "--config", "configs/tiny-cpu.yaml",
             "--set", f"output_dir={shared / 'run'}", "--set", f"cluster.address={cluster.address}"],
            cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=600)
    finally:
        cluster.stop()
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert re.fullmatch(re.escape(f"plad-ray: error: config key output_dir: {shared / 'run'} is a local folder that 1 "
                                  "of the cluster's 2 nodes do not see (") + r"[0-9.]+" + re.escape(
        "); on a multi-node cluster point output_dir (or cluster.storage, for a relative one) at shared storage: a "
        "folder mounted on every node, or a URI such as s3://bucket/runs"), last), last
    assert list(shared.iterdir()) == []  # no output folder, and the visibility marker removed
