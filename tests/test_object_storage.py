"""A run whose output_dir is on object storage, end to end against an S3 server on loopback (moto's; conftest):
two rounds, the evaluation and the model card, a run killed mid-training and resumed from its checkpoint in the
bucket, and jobs.evaluate on the finished run. The real engines, Ray Train and DeepSpeed read and write the bucket;
models exported there are fetched to cluster.model_cache for the next round and the evaluation."""

import json
import re
import subprocess

import pyarrow.fs as pafs
import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, ROOT, job_env
from fault import descendants, kill
from test_fault_tolerance import finish, start, wait_for
from plad_ray.data import parquet, storage
from plad_ray.models.cache import DONE

pytestmark = pytest.mark.integration
PROMPTS = 128


def listing(uri: str) -> set[str]:
    """Every object under `uri`, relative to it."""
    fs, path = storage.filesystem_and_path(uri)
    return {i.path[len(path) + 1:] for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if i.type == pafs.FileType.File}


def test_s3_output_dir_two_rounds_killed_and_resumed_then_evaluated(s3_server, tiny_models, tmp_path):
    uri = s3_server.bucket("plad-e2e") + "/runs/tiny"
    cache = tmp_path / "model-cache"
    command = [PYTHON, "-m", "jobs.distill", "--config", "configs/tiny-cpu.yaml", "--set", f"output_dir={uri}",
               "--set", f"data.max_prompts={PROMPTS}", "--set", "train.rounds=2", "--set", "train.micro_batch_size=2",
               "--set", "train.checkpoint_every_steps=10", "--set", "train.eval_every_steps=0",
               "--set", "eval.initial_student=false", "--set", f"cluster.model_cache={cache}"]
    env = {**s3_server.env}
    (tmp_path / "killed").mkdir()
    job, stdout, stderr = start(command, tmp_path / "killed", env=env)
    snapshot = f"{uri}/train/checkpoint_manager_snapshot.json"
    # Killed, driver and its whole local cluster, once Ray Train has registered a checkpoint in the bucket.
    wait_for(lambda: "step-" in json.dumps(storage.read_json(snapshot) or {}), job, timeout=900,
             what="the first checkpoint in the bucket")
    kill([*descendants(job.pid), job.pid])
    finish(job, stdout, stderr, timeout=60)
    assert storage.manifest(f"{uri}/student") is None  # killed before its export: nothing looks finished

    (tmp_path / "again").mkdir()
    again, stdout, stderr = start(command, tmp_path / "again", env=env)
    output, errors = finish(again, stdout, stderr, timeout=1500)
    assert again.returncode == 0, output[-3000:] + errors[-3000:]
    assert f"all {PROMPTS} outputs already cached" in output  # no teacher request on resume
    assert f"pairs: {PROMPTS * 2} pairs already complete" in output
    resumed = [int(step) for step in re.findall(r"resumed from checkpoint at step (\d+)", output)]
    assert resumed and resumed[0] >= 10, output[-3000:]

    objects = listing(uri)
    for folder in ("teacher", "pairs", "student", "round-2/pairs", "round-2/student", "eval"):
        assert any(o.startswith(f"{folder}/") for o in objects), folder
    assert {"student/_manifest.json", "round-2/student/_manifest.json", "round-2/student/README.md",
            "round-2/student/model.safetensors", "report.json", "summary.md", "loss_curve.png", "logs/run.log",
            "eval/report.json", "eval/summary.md", "eval/generations.jsonl"} <= objects
    assert not [o for o in objects if ".partial" in o]  # every dataset committed, nothing half-written left
    assert not list(ROOT.glob("s3:*"))  # no URI taken for a local path
    pairs = parquet.read_table(f"{uri}/round-2/pairs")
    keys = set(zip(pairs.column("id").to_pylist(), pairs.column("sample_index").to_pylist()))
    assert pairs.num_rows == len(keys) == PROMPTS * 2
    assert set(pairs.column("student_model").to_pylist()) == {"tiny:student after round 1"}

    report = storage.read_json(f"{uri}/report.json")
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for r in report["rounds"]:  # each round trained its planned steps, and its held-out ranking moved the method's way
        assert r["steps"] == storage.read_json(f"{uri}/{'' if r['round'] == 1 else 'round-2/'}train_report.json")[
            "curve"][-1]["step"] > resumed[0]
        before, after = r["eval_initial"], r["eval_trained"]
        assert after["loss"] < before["loss"] and after["margin"] > before["margin"], (before, after)
    models = report["evaluation"]["models"]
    assert set(models) == {"teacher (cached outputs)", "round 1 student", "round 2 student"}
    assert all(m["prompts"] == models["teacher (cached outputs)"]["prompts"] > 10 for m in models.values())
    assert "# Student distilled with plad-ray" in _object(f"{uri}/round-2/student/README.md").decode()

    # The round-1 export was fetched once to the model cache (round 2's engines, trainer and the evaluation read
    # that copy); the copy is the exported model, whose weights moved from the initial student's.
    copies = [d for d in cache.iterdir() if (d / DONE).is_file()]
    assert [d.name.split("-")[0] for d in copies] == ["student", "student"]  # round 1's and round 2's exports
    exported = _object(f"{uri}/student/model.safetensors")
    round_1 = next(d for d in copies if (d / "model.safetensors").read_bytes() == exported)
    initial = load_file(str(tiny_models["student"] + "/model.safetensors"))
    trained = load_file(str(round_1 / "model.safetensors"))
    assert all(not torch.equal(trained[k].float(), initial[k].float()) for k in initial)

    evaluated = subprocess.run([PYTHON, "-m", "jobs.evaluate", "--config", "configs/tiny-cpu.yaml",
                                *command[command.index("--set"):]], cwd=ROOT, env={**job_env(), **env},
                               capture_output=True, text=True, timeout=900)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    again_eval = storage.read_json(f"{uri}/eval/report.json")
    assert set(again_eval["models"]) == set(models)
    assert again_eval["models"]["round 2 student"]["exact_match"] == models["round 2 student"]["exact_match"]


def _object(uri: str) -> bytes:
    fs, path = storage.filesystem_and_path(uri)
    with fs.open_input_stream(path) as f:
        return f.read()
