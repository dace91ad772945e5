"""A trainer rank imports DeepSpeed without MLflow (DeepSpeed's autotuner would import it: 1.5 s per rank),
and MLflow still imports afterwards for the rank that logs to it."""

import subprocess

from conftest import PYTHON, job_env

SCRIPT = """
import sys
from plad_ray.train.worker import _import_deepspeed
deepspeed = _import_deepspeed()
print("deepspeed" in sys.modules, "mlflow" in sys.modules)
import mlflow
from deepspeed.autotuning import autotuner
print(mlflow.__name__, autotuner.has_mlflow)
"""


def test_deepspeed_is_imported_without_mlflow_and_mlflow_imports_after():
    out = subprocess.run([PYTHON, "-c", SCRIPT], env=job_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()[-2:]  # DeepSpeed prints its accelerator warning first
    assert lines == ["True False", "mlflow False"]
