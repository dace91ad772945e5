"""Kill real processes mid-run, or Ctrl-C a job; it must finish with every step and every pair, once."""

import json
import math
import re
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, job_env
from safetensors.torch import load_file
from support.fault import alive, descendants, find, find_in, kill, write_pairs
from support.jobs import command as job_command
from support.ray_head import RayHead

from plad_ray.data import parquet

pytestmark = pytest.mark.integration
PROMPTS = 256  # of the demo's 1,024: the Ctrl-C test's prompts


def start(command, log_dir, env: dict | None = None):
    """The job with its output in files (a pipe nobody reads would fill up and stall it), and Ctrl-C's signal
    handled as on a terminal: a test run started in the background by a shell without job control (`make test
    &` in a script) inherits SIGINT ignored, and a Python started with SIGINT ignored keeps ignoring it."""
    out, err = open(log_dir / "stdout.log", "w+"), open(log_dir / "stderr.log", "w+")
    return (
        subprocess.Popen(
            command,
            cwd=ROOT,
            env={**job_env(), **(env or {})},
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,
            preexec_fn=_sigint_as_on_a_terminal,
        ),
        out,
        err,
    )


def _sigint_as_on_a_terminal():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finish(job, out, err, timeout=900) -> tuple[str, str]:
    job.wait(timeout=timeout)
    out.seek(0)
    err.seek(0)
    return out.read(), err.read()


def wait_for(condition, job, timeout=900, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert job.poll() is None, f"the job ended (exit {job.returncode}) before {what}"
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def traced_steps(folder) -> dict[int, list[tuple[int, list[str]]]]:
    """rank -> [(step, pair keys)] in the order the rank trained them (PLAD_RAY_TRACE_PAIRS files)."""
    return {
        int(f.stem.split("-")[1]): [(r["step"], r["keys"]) for r in map(json.loads, f.read_text().splitlines())]
        for f in sorted(folder.glob("rank-*.jsonl"))
    }


def test_killed_training_worker_resumes_exactly_where_its_checkpoint_was(tmp_path, tiny_models):
    # One rank is killed mid-epoch after a checkpoint: the worker group restarts from it and must train the
    # steps after it on exactly the pairs it would have, each pair once per epoch, ending on the weights of
    # a run that was never interrupted.
    write_pairs(tmp_path / "synthetic", 640)  # ~576 training pairs: 72 steps of 2 workers x 4 pairs
    command = job_command(
        "train",
        f"train.pairs={tmp_path / 'synthetic' / 'pairs'}",
        "train.precision=fp32",
        "train.num_epochs=1",
        "train.micro_batch_size=4",
        "data.heldout_fraction=0.1",
        "train.checkpoint_every_steps=20",
        "train.max_failures=2",
        "train.log_every_steps=10",
        "train.eval_every_steps=0",
        f"train.checkpoint_staging_dir={tmp_path / 'staging'}",
    )
    runs = {}
    for name in ("killed", "uninterrupted"):
        out, trace = tmp_path / name, tmp_path / f"{name}-trace"
        trace.mkdir()
        (tmp_path / f"{name}-logs").mkdir()
        job, stdout, stderr = start(
            [*command, "--set", f"output_dir={out}"],
            tmp_path / f"{name}-logs",
            env={"PLAD_RAY_TRACE_PAIRS": str(trace)},
        )
        if name == "killed":
            # A checkpoint counts once Ray Train's controller has registered it (its snapshot names it),
            # not when the files land: kill after that, and after a few more steps, so that the restart
            # must skip into the middle of the epoch and redo the steps since the checkpoint.
            snapshot = out / "train" / "checkpoint_manager_snapshot.json"
            wait_for(lambda: snapshot.exists() and "step-" in snapshot.read_text(), job, what="the first checkpoint")
            rank_0 = trace / "rank-0.jsonl"
            wait_for(
                lambda: rank_0.exists() and rank_0.read_text().count("\n") >= 25, job, what="steps after the checkpoint"
            )
            workers = find(job.pid, "ray::RayTrainWorker")
            assert len(workers) == 2, workers
            kill(workers[:1])  # one rank dies: the whole worker group restarts from the last checkpoint
        output, errors = finish(job, stdout, stderr)
        assert job.returncode == 0, output[-3000:] + errors[-3000:]
        runs[name] = (out, traced_steps(trace), output)

    out, traced, output = runs["killed"]
    # The ranks wrote their checkpoints under train.checkpoint_staging_dir, which they created (Ray Train deletes each
    # copy once uploaded to output_dir/train; one the kill interrupted may be left).
    assert (tmp_path / "staging").is_dir()
    assert all(p.name.startswith("plad-ray-checkpoint-") for p in (tmp_path / "staging").iterdir())
    resumed = [int(s) for s in re.findall(r"resumed from checkpoint at step (\d+)", output)]
    assert resumed and resumed[0] >= 20 and resumed[0] % 20 == 0, output[-3000:]
    report = json.loads((out / "report.json").read_text())
    total = report["steps"]
    assert total == report["curve"][-1]["step"] == math.ceil(report["counts"]["train"] // 2 / 4) > resumed[0] + 5
    clean = runs["uninterrupted"][1]
    all_keys = set()
    for rank, records in traced.items():
        # The restarted run logs from the checkpoint's next step again: replay the log, a later record of a
        # step replacing the earlier one, after checking that the restart trained the same pairs there.
        final, redone = {}, 0
        for step, keys in records:
            if step in final:
                assert final[step] == keys, f"rank {rank} step {step}: the restart trained other pairs"
                redone += 1
            final[step] = keys
        assert redone > 0, f"rank {rank}: no step after the checkpoint (step {resumed[0]}) was trained again"
        assert sorted(final) == list(range(1, total + 1)), rank
        assert sorted(final.items()) == sorted((step, keys) for step, keys in clean[rank])  # as if never killed
        keys = [key for step_keys in final.values() for key in step_keys]
        assert len(keys) == len(set(keys)) == report["counts"]["train"] // 2, rank  # each of its pairs once
        assert not all_keys & set(keys)  # ranks train disjoint pairs
        all_keys |= set(keys)
    weights = load_file(str(out / "student" / "model.safetensors"))
    clean_weights = load_file(str(runs["uninterrupted"][0] / "student" / "model.safetensors"))
    initial = load_file(str(Path(tiny_models["student"]) / "model.safetensors"))
    gap = max((weights[k] - clean_weights[k]).abs().max().item() for k in weights)
    moved = max((clean_weights[k] - initial[k]).abs().max().item() for k in clean_weights)
    print(
        f"resumed at step {resumed[0]} of {total}: largest weight difference to the uninterrupted run {gap:.2e} "
        f"(weights moved up to {moved:.2e})"
    )
    assert gap <= 1e-6 < moved


def test_ctrl_c_then_resume_with_an_engine_killed_writes_every_pair_once(tmp_path, tiny_models):
    """Ctrl-C the job once its first pairs are on disk; run the same command again and kill
    its student engine actor (ray.data.llm replaces it): every pair exists exactly once."""
    out = tmp_path / "run"
    # Small engine batches: many blocks (32 of 256 prompts x 2 samples), so pairs reach disk while generation is
    # still going.
    command = job_command("generate_pairs", f"output_dir={out}", "student.batch_size=8", f"data.max_prompts={PROMPTS}")
    job, stdout_file, stderr_file = start(command, tmp_path)
    pending = out / "pairs.partial"
    wait_for(lambda: list(pending.glob("*.parquet")), job, what="the first pairs on disk")
    below = descendants(job.pid)  # its local Ray cluster, the student's engine actor and VLLM::EngineCore among them
    assert [p for p in below if find_in(p, "EngineCore")], "no vLLM engine process under the job"
    job.send_signal(signal.SIGINT)  # what Ctrl-C sends the job's driver
    stdout, stderr = finish(job, stdout_file, stderr_file, timeout=300)
    assert job.returncode == 130, stdout[-2000:] + stderr[-3000:]
    # The interrupted job leaves no process behind (an orphaned EngineCore would hold the model's memory).
    assert not [p for p in below if alive(p)], [Path(f"/proc/{p}/cmdline").read_bytes() for p in below if alive(p)]
    assert stderr.strip().splitlines()[-1] == "plad-ray: interrupted; re-run the same command to resume"
    assert not (out / "pairs" / "_manifest.json").exists()  # no pairs that look complete
    written = sum(pq.read_metadata(p).num_rows for p in parquet.written_files(str(out / "pairs")))
    assert 0 < written < PROMPTS * 2

    (tmp_path / "again").mkdir()
    again, stdout_file, stderr_file = start(command, tmp_path / "again")
    # The student engine of the second run: the teacher is cached, so the only engine is the student's.
    wait_for(lambda: find(again.pid, "vLLMEngineStageUDF"), again, what="the student engine")
    engines = find(again.pid, "vLLMEngineStageUDF")
    wait_for(lambda: [p for e in engines for p in find(e, "EngineCore")], again, what="the engine's vLLM process")
    below = [p for e in engines for p in descendants(e)]  # VLLM::EngineCore and its helpers
    kill(engines)  # the engine actor, as the OOM killer or a lost node would
    # What the killed actor started goes too, else its VLLM::EngineCore would live on holding the model's memory.
    wait_for(lambda: not [p for p in below if alive(p)], again, timeout=60, what="the killed engine's processes to end")
    wait_for(lambda: set(find(again.pid, "vLLMEngineStageUDF")) - set(engines), again, what="a replacement engine")
    stdout, stderr = finish(again, stdout_file, stderr_file)
    assert again.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert f"all {PROMPTS} outputs already cached" in stdout  # no teacher requests on resume
    assert "pairs already written by an earlier run" in stdout
    table = parquet.read_table(str(out / "pairs"))
    keys = list(zip(table.column("id").to_pylist(), table.column("sample_index").to_pylist()))
    assert len(keys) == len(set(keys)) == PROMPTS * 2
    assert not pending.exists()


def test_streamed_training_with_an_engine_killed_trains_every_pair_once(tmp_path, tiny_models):
    """train.stream on two Ray nodes (a DeepSpeed rank on each): the student engines feed the ranks while they
    generate; kill the engine actor once its first pairs are on disk (ray.data.llm replaces it). Every pair is on
    disk once, every training pair is trained exactly once in the streamed epoch (no held-out pair: the split's
    order does not depend on which node made a block) and once in the second epoch, which resumes from the streamed
    one's checkpoint and reads the pairs from disk; the student learned."""
    out, trace = tmp_path / "run", tmp_path / "trace"
    trace.mkdir()
    cluster = RayHead(num_cpus=3)
    try:
        cluster.add_node(num_cpus=3)
        # Small engine batches: many blocks, so the engine is still generating when the ranks train.
        command = job_command(
            "distill",
            f"output_dir={out}",
            "train.stream=true",
            f"cluster.address={cluster.address}",
            "train.placement_strategy=SPREAD",
            "student.batch_size=8",
            "eval.enabled=false",
            "data.max_prompts=256",
            "train.num_epochs=2",
        )
        job, stdout_file, stderr_file = start(
            command, tmp_path, env={**cluster.env, "PLAD_RAY_TRACE_PAIRS": str(trace)}
        )
        # The engine's first block on disk: it has most of its work ahead, inside the trainer's stream
        wait_for(lambda: list((out / "pairs.partial").glob("*.parquet")), job, what="the stream's first pairs on disk")
        engines = cluster.processes("vLLMEngineStageUDF")
        assert engines and len(cluster.processes("RayTrainWorker")) == 2, "engines and trainer workers not up together"
        trainers = {
            a["node_id"]
            for a in json.loads(
                cluster.job_cli("list", "actors", "--format", "json", "--detail", "--limit", "10000").stdout
            )
            if a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE"
        }
        assert len(trainers) == 2  # a rank on each node
        kill(engines)
        wait_for(lambda: set(cluster.processes("vLLMEngineStageUDF")) - set(engines), job, what="a replacement engine")
        stdout, stderr = finish(job, stdout_file, stderr_file)
    finally:
        cluster.stop()
    assert job.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "streaming into training" in stdout

    table = parquet.read_table(str(out / "pairs"))
    keys = [f"{i}#{s}" for i, s in zip(table.column("id").to_pylist(), table.column("sample_index").to_pylist())]
    assert len(keys) == len(set(keys)) == 256 * 2
    heldout = {k for k, h in zip(keys, table.column("heldout").to_pylist()) if h}
    records = [json.loads(line) for f in sorted(trace.glob("rank-*.jsonl")) for line in f.read_text().splitlines()]
    assert {int(f.stem.split("-")[1]) for f in trace.glob("rank-*.jsonl")} == {0, 1}
    report = json.loads((out / "report.json").read_text())
    streamed = report["streamed_epoch_steps"]
    for epoch in (0, 1):
        trained = [k for r in records if r["epoch"] == epoch for k in r["keys"]]
        assert len(trained) == len(set(trained)), epoch  # each pair once an epoch
        assert set(trained) == set(keys) - heldout, epoch  # every training pair (the demo has none identical)
        steps = {r["step"] for r in records if r["epoch"] == epoch}
        assert (max(steps) <= streamed) if epoch == 0 else (min(steps) == streamed + 1)
    assert report["counts"]["heldout"] == len(heldout)
    assert report["steps"] == max(r["step"] for r in records) > streamed
    assert "resumed from checkpoint at step" in stdout
    # the method at work: the ranking moved, the teacher's outputs got likelier, and the weights changed
    initial, after = report["eval_initial"], report["eval_trained"]
    assert after["ranking_accuracy"] > initial["ranking_accuracy"] + 0.1
    assert after["chosen_nll_per_token"] < initial["chosen_nll_per_token"]
    weights = load_file(str(out / "student" / "model.safetensors"))
    before = load_file(str(Path(tiny_models["student"]) / "model.safetensors"))
    assert any(not (weights[name].float() == before[name].float()).all() for name in before)
