"""Every job refuses bad input before starting Ray: one line naming the input, its exit code,
and no output left behind as if complete."""

import subprocess

import pytest

from conftest import PYTHON, ROOT, job_env

CONFIG = ROOT / "configs" / "tiny-cpu.yaml"


def run_job(job: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", f"jobs.{job}", "--config", *args], cwd=ROOT, env=job_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def prompt_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "noprompt.jsonl").write_text('{"text": "abc>"}\n')
    (tmp_path / "model").mkdir()
    return tmp_path


CASES = [
    # (config overrides, exit code, expected text in the one line)
    (["data.prompts={tmp}/missing.jsonl"], 3, "prompt source {tmp}/missing.jsonl: not found"),
    (["data.prompts={tmp}/empty.jsonl"], 3, "prompt source {tmp}/empty.jsonl: has no rows"),
    (["data.prompts={tmp}/noprompt.jsonl"], 3, "prompt file {tmp}/noprompt.jsonl line 1: no 'prompt' key"),
    (["train.zero_stage=5"], 2, "config key train.zero_stage: must be a DeepSpeed ZeRO stage"),
    (["train.loss.betta=1"], 2, "config key train.loss.betta: unknown key"),
    (["teacher.model={tmp}/nowhere"], 3, "config key teacher.model: model folder {tmp}/nowhere not found"),
    (["student.model={tmp}/model"], 3, "config key student.model: {tmp}/model has no config.json"),
]


@pytest.mark.parametrize("job", ["distill", "generate_pairs"])
@pytest.mark.parametrize("overrides, code, message", CASES)
def test_bad_input_one_line_and_nothing_written(job, overrides, code, message, prompt_files):
    out = prompt_files / "run"
    sets = [x for o in overrides for x in ("--set", o.format(tmp=prompt_files))]
    proc = run_job(job, str(CONFIG), "--set", f"output_dir={out}", *sets)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("plad-ray: error: "), proc.stderr
    assert message.format(tmp=prompt_files) in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()


def test_missing_config_file_and_debug_traceback(tmp_path):
    proc = run_job("train", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"plad-ray: error: config file {tmp_path}/nope.yaml: not found; " \
                                  "pass an existing YAML file to --config"
    debug = run_job("train", str(tmp_path / "nope.yaml"), "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_train_without_pairs_says_what_to_run_first(tmp_path, tiny_models):
    out = tmp_path / "run"
    proc = run_job("train", str(CONFIG), "--set", f"output_dir={out}")
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"plad-ray: error: pairs {out}/pairs: missing or incomplete; run jobs.generate_pairs first")


@pytest.mark.parametrize(
    "job, overrides, message",
    [
        ("distill", ["train.num_workers=4"], "config key train.num_workers: 4 workers x 1 CPUs plus 1 CPU for the data"),
        ("train", ["train.cpus_per_worker=2"], "config key train.num_workers: 2 workers x 2 CPUs plus 1 CPU"),
        ("generate_pairs", ["student.replicas=5"], "config key student.replicas: 5 replicas x 1 workers x 1 CPUs"),
    ],
)
def test_plans_the_local_cluster_cannot_place_are_refused(job, overrides, message, tmp_path, tiny_models):
    # configs/tiny-cpu.yaml starts a local cluster of cluster.num_cpus=4 logical CPUs.
    out = tmp_path / "run"
    if job == "train":
        (out / "pairs").mkdir(parents=True)
        (out / "pairs" / "_manifest.json").write_text('{"files": [], "rows": 0}')
    sets = [x for o in overrides for x in ("--set", o)]
    proc = run_job(job, str(CONFIG), "--set", f"output_dir={out}", *sets)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]
    assert "started a local Ray cluster" not in proc.stdout
    assert not (out / "run.json").exists()
