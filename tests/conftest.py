"""Shared fixtures. Pure tests need nothing; integration tests build the tiny models once."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


@pytest.fixture(scope="session")
def tiny_models() -> dict:
    """Folders of the tiny teacher and student (built on first use, cached)."""
    from plad_ray.models import tiny

    return {role: tiny.materialize(tiny.PREFIX + role) for role in tiny.RECIPES}


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster in the test process, for tests of Ray Data steps called directly."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def job_env() -> dict:
    """Environment for job subprocesses: no inherited Ray address, the repo importable."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    return env
