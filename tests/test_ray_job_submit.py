"""The cluster path users take: `ray start --head`, then `ray job submit ... jobs.distill`."""

import json

import pytest

from conftest import ROOT
from plad_ray.data import parquet
from ray_head import RayHead

pytestmark = pytest.mark.integration


@pytest.fixture
def head():
    cluster = RayHead(num_cpus=4)
    yield cluster
    cluster.stop()


def test_distill_through_ray_job_submit(head, tiny_models, tmp_path):
    out = tmp_path / "run"
    submit = head.job(
        "submit", "--working-dir", str(ROOT), "--",
        "python", "-m", "jobs.distill", "--config", "configs/tiny-cpu.yaml",
        "--set", f"output_dir={out}", "--set", "data.max_prompts=96", "--set", "train.num_epochs=1",
    )
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
    assert "succeeded" in (submit.stdout + submit.stderr)
    listed = head.job("list")
    assert "SUCCEEDED" in listed.stdout, listed.stdout[-2000:]
    # The job ran against the cluster it was given, not a local one of its own.
    assert "joined Ray cluster" in submit.stdout
    assert parquet.read_table(str(out / "pairs")).num_rows == 96 * 2
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["pairs"] == 96 * 2 and report["steps"] > 0
    assert (out / "student" / "model.safetensors").is_file()
