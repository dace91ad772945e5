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
    """A local Ray cluster in the test process, for tests of Ray Data steps called directly; set up as
    plad-ray sets up its own (plad_ray.cluster: idle workers kept, Ray Data's settings)."""
    import ray

    from plad_ray import cluster

    for name, value in cluster.raylet_env().items():
        os.environ.setdefault(name, value)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cluster.configure_data()
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def job_env() -> dict:
    """Environment for job subprocesses: no inherited Ray address, the repo importable."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    return env


MLFLOW_SERVER = ROOT / ".venv" / "mlflow-server" / "bin" / "mlflow"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback (SQLite store), from its own venv (make test builds it)."""
    import socket
    import subprocess
    import time
    import urllib.request

    if not MLFLOW_SERVER.exists():
        pytest.fail(f"{MLFLOW_SERVER} is missing: run make test (it builds the MLflow server's venv)")
    folder = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(folder / "server.log", "w")
    server = subprocess.Popen(
        [str(MLFLOW_SERVER), "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
         "--default-artifact-root", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail(f"the MLflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield uri
    server.terminate()
    server.wait(timeout=30)
    log.close()
