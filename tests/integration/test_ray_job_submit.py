"""The cluster path users take, on one machine: `ray start --head`, a second node with
`ray start --address`, then `ray job submit ... jobs.distill`, with the run's outputs on object storage (moto's S3
server on loopback; conftest). Ray's own state API must show the work ran on both nodes; the same command on a new
cluster resumes the run from its checkpoint in the bucket (and evaluates it in the same job); raising train.rounds on
the finished run reuses round 1 and trains round 2 from round 1's export, fetched to cluster.model_cache; jobs.evaluate
evaluates both rounds' students."""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, ROOT
from safetensors.torch import load_file
from support.objects import listing, read_object
from support.ray_head import RayHead

from plad_ray.data import parquet, storage
from plad_ray.models.cache import DONE

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
    raise AssertionError(
        f"ray list {kind}: exit {listed.returncode}, {listed.stdout[-1000:]!r} {listed.stderr[-2000:]}"
    )


def placement(cluster: RayHead) -> tuple[set, list, list]:
    """The cluster's alive nodes, and the nodes its trainer ranks and vLLM engines ran on."""
    nodes = {n["node_id"] for n in state(cluster, "nodes") if n["state"] == "ALIVE"}
    actors = state(cluster, "actors")
    return (
        nodes,
        [a["node_id"] for a in actors if a["class_name"] == "RayTrainWorker"],
        [a["node_id"] for a in actors if "vLLMEngineStageUDF" in a["class_name"]],
    )


PROMPTS = 160


def test_distill_on_s3_through_ray_job_submit_on_two_nodes_resumes_on_a_new_cluster_then_a_second_round(
    s3_server, tiny_models, tmp_path
):
    """`ray job submit` on two nodes, outputs in a bucket; the cluster dies mid-training (its processes killed, as
    when the head node is lost); the same command on a new cluster (new temp dirs: another session folder, so
    another path to the same uploaded package) resumes from the checkpoint in the bucket and asks the teacher for
    nothing it had. Then, on that cluster, train.rounds=2 on the finished run, and jobs.evaluate."""
    # The config's relative output_dir (runs/tiny-cpu), as the README's command gives it: under the job it goes
    # under cluster.storage (here a bucket: the nodes' environment points pyarrow at the S3 server), not into
    # Ray's temporary copy of the working dir.
    out = s3_server.bucket("plad-submit") + "/storage/runs/tiny-cpu"
    cache = tmp_path / "model-cache"  # a local folder on every node (one machine here: the nodes share it)
    command = [
        "submit",
        "--working-dir",
        str(ROOT),
        "--",
        "python",
        "-m",
        "jobs.distill",
        "--config",
        "configs/tiny-cpu.yaml",
        "--set",
        "cluster.storage=s3://plad-submit/storage",
        "--set",
        f"cluster.model_cache={cache}",
        "--set",
        f"data.max_prompts={PROMPTS}",
        "--set",
        "train.placement_strategy=SPREAD",
        "--set",
        # 68 steps a round (2 ranks x 2 pairs); a checkpoint every 5 to resume from. At 4 pairs (34 steps) an "AMD EPYC"
        # VM once finished the round and exported before the kill below saw the first checkpoint registered.
        "train.micro_batch_size=2",
        "--set",
        "train.checkpoint_every_steps=5",
        "--set",
        "eval.initial_student=false",
        "--debug",
    ]
    first = two_nodes()  # started after s3_server: its nodes (and so the job's processes) have the S3 settings
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
        # ... then the cluster is killed as soon as Ray Train has registered a checkpoint in the bucket.
        snapshot = f"{out}/train/checkpoint_manager_snapshot.json"
        while "step-" not in json.dumps(storage.read_json(snapshot) or {}):
            assert time.time() < deadline, first.job("list").stdout[-3000:]
            time.sleep(0.5)
    finally:
        first.stop()  # mid-training: every process of the cluster killed
    # The job joined the cluster it was given and ran there: one trainer rank per node (SPREAD); the teacher's and
    # the student's engines.
    assert len(trainers) == 2 and set(trainers) == nodes, (trainers, nodes)
    assert len(engines) == 2 and set(engines) <= nodes
    assert storage.manifest(f"{out}/pairs") is not None
    assert storage.manifest(f"{out}/student") is None  # killed before its export: nothing looks finished

    second = two_nodes()
    try:
        submit = second.job(*command)
        nodes, trainers, engines = placement(second)
        # The resumed run's report and evaluation, before the second round rewrites them.
        round_1, evaluation = (storage.read_json(f"{out}/{name}") for name in ("report.json", "eval/report.json"))
        # Raising train.rounds on the finished run (its evaluation left to the evaluation job), then the evaluation
        # job, on the same cluster.
        rounds = command + ["--set", "train.rounds=2"]
        round_2 = second.job(*rounds, "--set", "eval.enabled=false")
        evaluate = second.job(
            *rounds[: rounds.index("jobs.distill")],
            "jobs.evaluate",
            *rounds[rounds.index("jobs.distill") + 1 :],
            timeout=900,
        )
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
    # ... where they outlive the job's cluster: pairs, checkpoint, report, summary; no URI taken for a local path.
    assert not list(Path(second.temp_dir).glob("session_*/runtime_resources/working_dir_files/*/runs"))
    assert not list(Path(second.temp_dir).glob("session_*/runtime_resources/working_dir_files/*/s3:*"))
    assert not list(ROOT.glob("s3:*"))
    assert parquet.read_table(f"{out}/pairs").num_rows == PROMPTS * 2
    assert round_1["counts"]["pairs"] == PROMPTS * 2 and round_1["steps"] > resumed[0]
    # The evaluation ran after training, in the same job (its driver's working directory is Ray's package copy,
    # which Ray may replace meanwhile: paths were fixed at config load).
    assert set(evaluation["models"]) == {"teacher (cached outputs)", "trained student"}
    assert (
        evaluation["models"]["trained student"]["prompts"]
        == round_1["evaluation"]["models"]["trained student"]["prompts"]
        > 0
    )

    # Round 2 on the finished run: round 1 reused (no teacher request, not retrained), round 2 samples round 1's
    # student and trains from it; then jobs.evaluate evaluates both rounds' students.
    assert round_2.returncode == 0, round_2.stdout[-4000:] + round_2.stderr[-2000:]
    assert evaluate.returncode == 0, evaluate.stdout[-3000:] + evaluate.stderr[-3000:]
    assert "0 teacher requests" in round_2.stdout and "round 1 already complete" in round_2.stdout
    objects = listing(out)
    for folder in ("teacher", "pairs", "student", "round-2/pairs", "round-2/student", "eval"):
        assert any(o.startswith(f"{folder}/") for o in objects), folder
    assert {
        "student/_manifest.json",
        "round-2/student/_manifest.json",
        "round-2/student/README.md",
        "round-2/student/model.safetensors",
        "report.json",
        "summary.md",
        "loss_curve.png",
        "logs/run.log",
        "eval/report.json",
        "eval/summary.md",
        "eval/generations.jsonl",
    } <= objects
    assert not [o for o in objects if ".partial" in o]  # every dataset committed, nothing half-written left
    first_pairs, pairs = parquet.read_table(f"{out}/pairs"), parquet.read_table(f"{out}/round-2/pairs")
    keys = set(zip(pairs.column("id").to_pylist(), pairs.column("sample_index").to_pylist()))
    assert pairs.num_rows == len(keys) == PROMPTS * 2
    assert set(pairs.column("student_model").to_pylist()) == {"tiny:student after round 1"}

    def chosen(table):
        return dict(zip(table.column("id").to_pylist(), table.column("chosen").to_pylist()))

    assert chosen(pairs) == chosen(first_pairs)  # the same teacher outputs
    report = storage.read_json(f"{out}/report.json")
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["rounds"][0]["eval_trained"] == round_1["eval_trained"]  # round 1 reused, not retrained
    assert report["checkpoint"] == f"{out}/round-2/student"
    for r in report["rounds"]:  # each round trained its planned steps, and its held-out ranking moved the method's way
        assert (
            r["steps"]
            == storage.read_json(f"{out}/{'' if r['round'] == 1 else 'round-2/'}train_report.json")["curve"][-1]["step"]
            > resumed[0]
        )
        before, after = r["eval_initial"], r["eval_trained"]
        assert after["loss"] < before["loss"] and after["margin"] > before["margin"], (before, after)
    # Round 2 starts from round 1's student: its held-out pairs (new student samples) begin where round 1's trained
    # student ranks them, and training moves them again.
    assert (
        report["rounds"][1]["eval_trained"]["ranking_accuracy"]
        > report["rounds"][1]["eval_initial"]["ranking_accuracy"]
    )
    # jobs.evaluate's evaluation, in eval/ and in the run's report: each round's student beside the teacher's
    # outputs, round 1's with the figures the resumed job's own evaluation gave it (the same weights, greedy).
    assert report["evaluation"] == storage.read_json(f"{out}/eval/report.json")
    models = report["evaluation"]["models"]
    assert set(models) == {"teacher (cached outputs)", "round 1 student", "round 2 student"}
    assert all(m["prompts"] == models["teacher (cached outputs)"]["prompts"] > 10 for m in models.values())
    assert models["round 1 student"]["exact_match"] == evaluation["models"]["trained student"]["exact_match"]
    assert "# Student distilled with plad-ray" in read_object(f"{out}/round-2/student/README.md").decode()

    # Each export in the bucket was fetched once to the model cache (round 2's engine and trainer and the
    # evaluation job read those copies); round 1's copy is the exported model, whose weights moved from the initial
    # student's.
    copies = [d for d in cache.iterdir() if (d / DONE).is_file()]
    assert [d.name.split("-")[0] for d in copies] == ["student", "student"], copies  # round 1's and round 2's
    exported = read_object(f"{out}/student/model.safetensors")
    fetched = next(d for d in copies if (d / "model.safetensors").read_bytes() == exported)
    initial = load_file(str(tiny_models["student"] + "/model.safetensors"))
    trained = load_file(str(fetched / "model.safetensors"))
    assert all(not torch.equal(trained[k].float(), initial[k].float()) for k in initial)


def test_local_output_dir_that_a_node_cannot_see_is_refused(tiny_models, tmp_path):
    """On a multi-node cluster, a local output_dir that another node does not see (no shared mount) stops
    the run with one line naming output_dir, before anything is written."""
    shared = tmp_path / "not-shared"
    shared.mkdir()
    cluster = RayHead(num_cpus=2)
    try:
        cluster.add_node(num_cpus=1, hide=str(shared))
        run = subprocess.run(
            [
                PYTHON,
                "-m",
                "jobs.generate_pairs",
                "--config",
                "configs/tiny-cpu.yaml",
                "--set",
                f"output_dir={shared / 'run'}",
                "--set",
                f"cluster.address={cluster.address}",
            ],
            cwd=ROOT,
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        cluster.stop()
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        re.escape(
            f"plad-ray: error: config key output_dir: {shared / 'run'} is a local folder that 1 "
            "of the cluster's 2 nodes do not see ("
        )
        + r"[0-9.]+"
        + re.escape(
            "); on a multi-node cluster point output_dir (or cluster.storage, for a relative one) at shared storage: a "
            "folder mounted on every node, or a URI such as s3://bucket/runs"
        ),
        last,
    ), last
    assert list(shared.iterdir()) == []  # no output folder, and the visibility marker removed
