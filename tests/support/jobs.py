"""A job run as a user runs it: `python -m jobs.<name> --config <file> --set key=value ...` from the repository, in a
process of its own (with its own local Ray cluster unless told to join one), its output captured."""

import subprocess

from conftest import PYTHON, ROOT, job_env

DEMO = "configs/tiny-cpu.yaml"


def command(job: str, *sets: str, config: str = DEMO) -> list[str]:
    """The job's command line, each of `sets` (key=value) one --set override."""
    return [PYTHON, "-m", f"jobs.{job}", "--config", config, *[arg for s in sets for arg in ("--set", s)]]


def run_job(
    job: str,
    *sets: str,
    flags: tuple[str, ...] = (),
    config: str = DEMO,
    env: dict | None = None,
    timeout: int = 900,
) -> subprocess.CompletedProcess:
    """Run jobs.<job> on `config` (the demo's by default) with `sets` and `flags` (e.g. --overwrite) to its end."""
    return subprocess.run(
        [*command(job, *sets, config=config), *flags],
        cwd=ROOT,
        env=job_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
