"""The cluster path users take, on one machine: `ray start --head`, a second node with
`ray start --address`, then `ray job submit ... jobs.distill`. Ray's own state API must
show the work ran on both nodes; the same command on a new cluster resumes the run."""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT
from ray_head import RayHead

pytestmark = pytest.mark.integration


def two_nodes() -> RayHead:
    cluster = RayHead(num_cpus=2)
    cluster.add_node(num_cpus=2)
    return cluster


def state(cluster: RayHead, kind: str) -> list[dict]:
    """Ray's state API (served by the dashboard, which may answer a moment after `ray start` returns)."""
    for _ in range(30):
        listed = cluster.job_cli("list", kind, "--format", "json", "--detail", "--limit", "10000")
        if listed.returncode == 0 and listed.stdout.strip() == "No resource in the cluster":
            return []  # what Ray prints for an empty list
        try:
            return json.loads(listed.stdout)
        except ValueError:
            time.sleep(1)
    raise AssertionError(f"ray list {kind}: exit {listed.returncode}, {listed.stdout[-1000:]!r} {listed.stderr[-2000:]}")


def placement(cluster: RayHead) -> tuple[set, list, list]:
    """The cluster's alive nodes, and the nodes its trainer ranks and vLLM engines ran on."""
    nodes = {n["node_id"] for n in state(cluster, "nodes") if n["state"] == "ALIVE"}
    actors = state(cluster, "actors")
    return (nodes, [a["node_id"] for a in actors if a["class_name"] == "RayTrainWorker"],
            [a["node_id"] for a in actors if "vLLMEngineStageUDF" in a["class_name"]])


PROMPTS = 160


def test_distill_through_ray_job_submit_on_two_nodes_resumes_on_a_new_cluster(tiny_models, tmp_path):
    """`ray job submit` on two nodes; the cluster dies mid-training (its processes killed, as when the head node is
    lost); the same command on a new cluster (new temp dirs: another session folder, so another path to the same
    uploaded package) resumes from the checkpoint and asks the teacher for nothing it had."""
    # The config's relative output_dir (runs/tiny-cpu), as the README's command gives it: under the job it
    # goes under cluster.storage, not into Ray's temporary copy of the working dir.
    out = tmp_path / "runs" / "tiny-cpu"
    command = ["submit", "--working-dir", str(ROOT), "--",
               "python", "-m", "jobs.distill", "--config", "configs/tiny-cpu.yaml",
               "--set", f"cluster.storage={tmp_path}",
               "--set", f"data.max_prompts={PROMPTS}", "--set", "train.placement_strategy=SPREAD",
               "--set", "train.micro_batch_size=2", "--set", "train.checkpoint_every_steps=5",
               "--set", "eval.initial_student=false", "--debug"]
    first = two_nodes()
    try:
        assert len({n["node_id"] for n in state(first, "nodes") if n["state"] == "ALIVE"}) == 2
        submitted = first.job(*command[:1], "--no-wait", *command[1:])
        assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
        deadline = time.time() + 900
        # Where the work ran, asked while the ranks start (the state API takes seconds; the steps do not wait) ...
        while True:
            nodes, trainers, engines = placement(first)
            if len([node for node in trainers if node]) == 2:  # both ranks placed on their nodes
                break
            assert time.time() < deadline and "FAILED" not in first.job("list").stdout, first.job("list").stdout
            time.sleep(1)
        # ... then the cluster is killed as soon as Ray Train has registered a checkpoint.
        snapshot = out / "train" / "checkpoint_manager_snapshot.json"
        while not (snapshot.exists() and "step-" in snapshot.read_text()):
            assert time.time() < deadline, first.job("list").stdout[-3000:]
            time.sleep(0.2)
    finally:
        first.stop()  # mid-training: every process of the cluster killed
    # The job joined the cluster it was given and ran there: one trainer rank per node (SPREAD); the teacher's and
    # the student's engines.
    assert len(trainers) == 2 and set(trainers) == nodes, (trainers, nodes)
    assert len(engines) == 2 and set(engines) <= nodes
    assert (out / "pairs" / "_manifest.json").is_file() and not (out / "student").exists()

    second = two_nodes()
    try:
        submit = second.job(*command)
        nodes, trainers, engines = placement(second)
    finally:
        second.stop()
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
    assert "succeeded" in (submit.stdout + submit.stderr) and "joined Ray cluster" in submit.stdout
    assert f"all {PROMPTS} outputs already cached" in submit.stdout  # no teacher request
    assert f"pairs: {PROMPTS * 2} pairs already complete" in submit.stdout
    resumed = [int(step) for step in re.findall(r"resumed from checkpoint at step (\d+)", submit.stdout)]
    assert resumed and resumed[0] >= 5, submit.stdout[-3000:]
    assert len(trainers) == 2 and set(trainers) == nodes
    assert len(engines) == 1  # the evaluation's trained student; no teacher or student generation again
    # The outputs' absolute location, said at the start and at the end ...
    assert submit.stdout.count(f"outputs: {out}\n") == 2, submit.stdout[-3000:]
    # ... where they outlive the job's cluster: pairs, checkpoint, report, summary.
    assert not list(Path(second.temp_dir).glob("session_*/runtime_resources/working_dir_files/*/runs"))
    from plad_ray.data import parquet

    assert parquet.read_table(str(out / "pairs")).num_rows == PROMPTS * 2
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["pairs"] == PROMPTS * 2 and report["steps"] > resumed[0]
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
