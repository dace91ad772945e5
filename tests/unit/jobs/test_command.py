"""The `plad-ray` console command: its help, its jobs, and one line for a job it does not know."""

import subprocess
import sys
from pathlib import Path

import pytest

from jobs import command


def test_help_lists_every_job_and_each_job_names_its_config_sections(capsys):
    with pytest.raises(SystemExit) as exit_:
        command.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for job in ("distill", "generate-pairs", "train", "evaluate", "compare"):
        assert f"\n  {job} " in out
    assert "Generate teacher outputs" in out  # the job's own first docstring line
    for job, (_, sections) in command.JOBS.items():
        with pytest.raises(SystemExit) as exit_:
            command.main([job, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: plad-ray {job} ") and "--config CONFIG" in text and "--check" in text
        assert f"config sections read: {sections}" in " ".join(text.split())


def test_unknown_or_missing_job_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        command.main(["distil", "--config", "x.yaml"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "plad-ray: error: unknown job 'distil'; choose one of: distill, generate-pairs, train, evaluate, compare "
        "(plad-ray --help)"
    )
    with pytest.raises(SystemExit) as exit_:
        command.main([])
    assert exit_.value.code == 2 and "jobs:" in capsys.readouterr().out


def test_console_script_is_installed_and_runs_a_job(tmp_path):
    """pyproject.toml declares it: the venv has `plad-ray`, which runs the job (here its --check)."""
    exe = Path(sys.executable).parent / "plad-ray"
    assert exe.is_file(), "plad-ray is not installed in this venv: make venv"
    listed = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "generate-pairs" in listed.stdout
    missing = subprocess.run(
        [str(exe), "train", "--config", str(tmp_path / "none.yaml")], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("plad-ray: error: ")
    assert "none.yaml" in missing.stderr


def test_a_runtime_failure_names_its_stage_and_the_working_directory_that_vanished(tmp_path, monkeypatch):
    from jobs.cli import runtime_failure_line
    from plad_ray.errors import stage

    with pytest.raises(ValueError) as raised, stage("round 1 training"), stage("evaluation"):
        raise ValueError("boom\nmore")
    assert runtime_failure_line(raised.value, str(tmp_path)) == (
        "plad-ray: runtime failure in evaluation: ValueError: boom (re-run with --debug for the traceback)"
    )
    # A job's driver runs in Ray's copy of the working dir; when Ray unpacks it again (another node sharing this
    # node's temp dir), the driver's next os.getcwd() raises FileNotFoundError with no file name.
    gone = tmp_path / "_ray_pkg_0123"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(FileNotFoundError) as raised, stage("round 1 pair generation"):
        import os

        os.getcwd()
    assert raised.value.filename is None
    assert runtime_failure_line(raised.value, str(gone)) == (
        f"plad-ray: runtime failure in round 1 pair generation: FileNotFoundError: [Errno 2] No such file or "
        f"directory (the job's working directory {gone} was removed while it ran; under ray job submit give every "
        "node its own `ray start --temp-dir`) (re-run with --debug for the traceback)"
    )


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["--objectives", "seqkd"],
            "plad-ray: error: --objectives: give at least two, the default first (e.g. seqkd,hinge)",
        ),
        (
            ["--objectives", "seqkd,hinge[betta=1]", "--check"],
            "plad-ray: error: config key train.loss.betta: unknown key",
        ),
        (["--objectives", "seqkd,hinge", "--grid", "fast"], "plad-ray: error: --grid: 'fast' is not a comma-separated"),
        (["--objectives", "seqkd,hinge", "--seeds", "0"], "plad-ray: error: --seeds 0 / --widen 3: seeds must be >= 1"),
    ],
)
def test_compare_refuses_bad_options_in_one_line_before_anything_starts(args, line, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        command.main(["compare", "--config", "configs/tiny-cpu.yaml", "--out", str(tmp_path / "c"), *args])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(line)
    assert not (tmp_path / "c").exists()


def test_compare_check_names_its_plan_and_starts_nothing(capsys, tmp_path):
    command.main(
        ["compare", "--config", "configs/tiny-cpu.yaml", "--objectives", "seqkd,hinge[beta=0.5]", "--check"]
        + ["--seeds", "2", "--out", str(tmp_path / "c")]
    )
    out = capsys.readouterr().out
    assert f"[compare] 2 objectives, grid 0.000333, 0.001, 0.003, 2 seed(s) -> {tmp_path / 'c'}" in out
    assert "nothing was started" in out and not (tmp_path / "c").exists()
