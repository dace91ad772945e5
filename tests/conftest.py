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
MOTO_SERVER = ROOT / ".venv" / "moto-server" / "bin" / "moto_server"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(name: str, command: list[str], folder, ready_url: str, timeout_s: float = 120):
    """Start a server of its own venv (make test builds it) with its log in `folder`; return once `ready_url`
    answers (any HTTP status). The process, to stop at the end."""
    import subprocess
    import time
    import urllib.error
    import urllib.request

    if not Path(command[0]).exists():
        pytest.fail(f"{command[0]} is missing: run make test (it builds the {name} server's venv)")
    log = open(folder / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(ready_url, timeout=2)
            return server
        except urllib.error.HTTPError:  # it answers: up
            return server
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail(f"the {name} server did not start: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)


def stop(server) -> None:
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback (SQLite store), from its own venv (make test builds it)."""
    folder, port = tmp_path_factory.mktemp("mlflow"), free_port()
    uri = f"http://127.0.0.1:{port}"
    server = serve(
        "MLflow",
        [
            str(MLFLOW_SERVER),
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder}/mlflow.db",
            "--default-artifact-root",
            str(folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        folder,
        f"{uri}/health",
    )
    yield uri
    stop(server)


class S3Server:
    """moto's S3 server on loopback: `env` points pyarrow (AWS_ENDPOINT_URL) and so plad-ray, Ray Data and Ray Train
    at it; `bucket(name)` creates a bucket and gives its URI."""

    def __init__(self, port: int):
        self.endpoint = f"127.0.0.1:{port}"
        self.env = {
            "AWS_ENDPOINT_URL": f"http://{self.endpoint}",
            "AWS_ACCESS_KEY_ID": "plad-test",
            "AWS_SECRET_ACCESS_KEY": "plad-test-secret",
            "AWS_REGION": "us-east-1",
        }

    def bucket(self, name: str) -> str:
        import pyarrow.fs as pafs

        pafs.S3FileSystem(
            endpoint_override=self.endpoint,
            scheme="http",
            access_key=self.env["AWS_ACCESS_KEY_ID"],
            secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region=self.env["AWS_REGION"],
            allow_bucket_creation=True,
        ).create_dir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """An S3-compatible server on loopback (moto's, from its own venv: make test builds it); this test process's
    environment points at it too, so plad_ray.data.storage reads what the jobs wrote."""
    folder, port = tmp_path_factory.mktemp("s3"), free_port()
    server = serve("S3", [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)], folder, f"http://127.0.0.1:{port}/")
    s3 = S3Server(port)
    saved = {k: os.environ.get(k) for k in s3.env}
    os.environ.update(s3.env)
    yield s3
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    stop(server)
