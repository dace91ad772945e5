"""Ctrl-C in the middle of student generation, then the same command again: every pair once."""

import signal
import subprocess
import time

import pytest

from conftest import PYTHON, ROOT, job_env
from plad_ray.data import parquet

pytestmark = pytest.mark.integration


def test_interrupted_generation_resumes_without_duplicates(tmp_path, tiny_models):
    out = tmp_path / "run"
    # Small engine batches: many blocks, so pairs reach disk while generation is still going.
    command = [PYTHON, "-m", "jobs.generate_pairs", "--config", "configs/tiny-cpu.yaml",
               "--set", f"output_dir={out}", "--set", "student.batch_size=8"]
    job = subprocess.Popen(command, cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    pending = out / "pairs.partial"
    deadline = time.time() + 900
    while time.time() < deadline and job.poll() is None and not list(pending.glob("*.parquet")):
        time.sleep(0.2)
    assert job.poll() is None, "generation ended before any pair reached disk"
    job.send_signal(signal.SIGINT)  # what Ctrl-C sends the job's driver
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "plad-ray: interrupted; re-run the same command to resume"
    assert (out / "teacher" / "_manifest.json").is_file()  # the teacher stage had finished and committed
    assert not (out / "pairs" / "_manifest.json").exists()  # no pairs that look complete
    written_before = len(parquet.done_keys(str(out / "pairs"), ["id", "sample_index"]))
    assert 0 < written_before < 512

    again = subprocess.run(command, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "all 256 outputs already cached" in again.stdout  # no teacher requests on resume
    assert "pairs already written by an earlier run" in again.stdout
    table = parquet.read_table(str(out / "pairs"))
    keys = list(zip(table.column("id").to_pylist(), table.column("sample_index").to_pylist()))
    assert len(keys) == len(set(keys)) == 256 * 2
    assert not pending.exists()
