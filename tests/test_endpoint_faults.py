"""A black-box teacher misbehaving, on a stub OpenAI server on loopback: the real request workers (a Ray Data
actor pool on a local Ray cluster) and the real teacher step. Status codes vLLM's own server does not give
(429 with Retry-After, per-prompt 400s, 401 mid-run, a 503 spell) come from the stub; a real server killed
and restarted is in tests/test_http_teacher.py."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from openai_stub import send_json, serve
from plad_ray.checks import Inputs
from plad_ray.config import load_config
from plad_ray.data import parquet
from plad_ray.errors import RuntimeFailure
from plad_ray.generate.teacher import generate_teacher

pytestmark = pytest.mark.integration


class Stub:
    """An OpenAI completions server whose answer to each request `script(n, prompt)` decides:
    None for a normal completion (the prompt reversed), or (status, headers, body)."""

    def __init__(self, script):
        self.script, self.requests, self.lock = script, [], threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send(200, {}, {"data": [{"id": "stub-teacher"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    n = len(stub.requests)
                    stub.requests.append((time.monotonic(), body["prompt"]))
                answer = stub.script(n, body["prompt"])
                if answer is None:
                    text = body["prompt"][::-1]
                    answer = (200, {}, {"choices": [{"text": text, "finish_reason": "stop", "stop_reason": None}],
                                        "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(text)}})
                self._send(*answer)

            def _send(self, status, headers, payload):
                send_json(self, status, headers, payload)

        self.server, self.url = serve(Handler)

    def prompts(self) -> list[str]:
        return [p for _, p in self.requests]

    def close(self):
        self.server.shutdown()


PROMPTS = [f"prompt number {i:02d}" for i in range(12)]


def run(tmp_path, stub, *sets, prompts=PROMPTS):
    import ray

    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "teacher.model=stub-teacher",
                             f"teacher.endpoint.url={stub.url}", "teacher.endpoint.retry_wait_s=0.1",
                             "teacher.batch_size=4", "student.model=unused", f"data.prompts={tmp_path / 'p.jsonl'}", *sets])
    ds = ray.data.from_items([{"id": f"p{i:02d}", "prompt": p} for i, p in enumerate(prompts)])
    lines = []
    figures = generate_teacher(cfg, Inputs(prompts=ds.materialize(), num_prompts=len(prompts)), log=lines.append)
    return figures, lines, parquet.read_table(cfg.layout().teacher())


def test_429_retry_after_is_obeyed_and_counted(local_ray, tmp_path):
    # One worker sends its first batch of four at once; three of them are throttled for 1 s.
    stub = Stub(lambda n, prompt: (429, {"Retry-After": "1"}, {"error": {"message": "slow down"}}) if n < 3 else None)
    figures, lines, table = run(tmp_path, stub, "teacher.endpoint.concurrency=1")
    stub.close()
    assert sorted(table.column("prompt").to_pylist()) == PROMPTS and table.num_rows == 12
    e = figures["teacher_endpoint"]
    assert e["throttled"] == 3 and e["requests"] == 15 and e["retries"] == 0 and e["refused"] == 0
    assert e["throttle_wait_s"] == pytest.approx(3.0)
    times = [t for t, _ in stub.requests]
    assert min(times[4:7]) - max(times[:3]) >= 0.95  # the three retries waited out Retry-After
    assert e["completion_tokens"] == sum(len(p) for p in PROMPTS) == figures["teacher_tokens"]
    assert e["prompt_tokens"] == sum(len(p) for p in PROMPTS)
    assert "3 throttled (3.0 s waited)" in lines[-1]


def test_refused_prompts_are_set_aside_once_and_the_run_goes_on(local_ray, tmp_path):
    def script(n, prompt):
        if "03" in prompt or "07" in prompt:
            return 400, {}, {"object": "error", "message": f"content filter: {prompt}", "code": 400}
        if "09" in prompt:
            return 200, {}, {"choices": [{"text": "", "finish_reason": "stop"}], "usage": {"completion_tokens": 0}}
        return None

    stub = Stub(script)
    figures, lines, table = run(tmp_path, stub)
    assert table.num_rows == 9 and figures["teacher_generated"] == 9
    assert figures["teacher_endpoint"]["refused"] == 3
    refused = {}
    for file in (tmp_path / "run" / "quarantine" / "teacher").glob("*.jsonl"):
        for line in file.read_text().splitlines():
            record = json.loads(line)
            refused[record["id"]] = record
    assert sorted(refused) == ["p03", "p07", "p09"]
    assert refused["p03"]["status"] == 400
    assert refused["p03"]["reason"] == "HTTP 400: content filter: prompt number 03"
    assert refused["p09"]["reason"] == "empty completion (teacher.endpoint.allow_empty is false)"
    assert "3 prompts refused" in lines[-1]
    # A re-run asks for nothing: nine cached, three refused earlier (with where to look to ask again).
    asked = len(stub.requests)
    figures, lines, table = run(tmp_path, stub)
    stub.close()
    assert len(stub.requests) == asked and table.num_rows == 9
    assert figures["teacher_generated"] == 0 and figures["teacher_cached"] == 9
    assert any("3 prompts the endpoint refused earlier are not asked again" in line for line in lines)


def test_a_503_spell_is_ridden_out_within_the_budget(local_ray, tmp_path):
    start = []

    def script(n, prompt):
        start.append(start[0] if start else time.monotonic())
        if time.monotonic() - start[0] < 2.0:
            return 503, {}, {"error": {"message": "overloaded"}}
        return None

    stub = Stub(script)
    figures, lines, table = run(tmp_path, stub, "teacher.endpoint.max_outage_s=60", "teacher.endpoint.max_retries=2")
    stub.close()
    assert sorted(table.column("prompt").to_pylist()) == PROMPTS
    e = figures["teacher_endpoint"]
    assert e["retries"] > 0 and e["requests"] > 12
    assert 1.5 <= e["outage_s"] <= 30, e


def test_past_the_budget_one_line_then_a_resume(local_ray, tmp_path):
    down = threading.Event()

    def script(n, prompt):
        if n >= 4:
            down.set()
        return (503, {}, {"error": {"message": "upstream unavailable"}}) if down.is_set() else None

    stub = Stub(script)
    with pytest.raises(RuntimeFailure) as failure:
        run(tmp_path, stub, "teacher.endpoint.max_outage_s=2", "teacher.endpoint.concurrency=1")
    line = str(failure.value)
    assert "\n" not in line
    assert line.startswith(f"teacher endpoint {stub.url}: down for ")
    assert "more than teacher.endpoint.max_outage_s=2 (last error: HTTP 503: upstream unavailable)" in line
    safe = re.search(r"; (\d+) of 12 teacher outputs are safe on disk in (\S+); re-run the same command to resume$",
                     line)
    assert safe and safe.group(2) == str(tmp_path / "run" / "teacher"), line
    safe = int(safe.group(1))  # at most the four answered: the write of their file may not have landed
    down.clear()
    stub.script = lambda n, prompt: None
    asked = len(stub.requests)
    figures, _, table = run(tmp_path, stub)
    stub.close()
    assert sorted(table.column("prompt").to_pylist()) == PROMPTS  # every prompt once
    assert safe <= 4 and figures["teacher_cached"] == safe and figures["teacher_generated"] == 12 - safe
    assert len(stub.requests) - asked == 12 - safe
    # Tokens are this run's: the eight answers it got, not the four the failed run left.
    assert figures["teacher_tokens"] == sum(len(p) for p in stub.prompts()[asked:])


def test_a_revoked_key_stops_the_run_at_once(local_ray, tmp_path):
    stub = Stub(lambda n, prompt: (401, {}, {"error": {"message": "invalid api key"}}) if n >= 2 else None)
    with pytest.raises(RuntimeFailure) as failure:
        run(tmp_path, stub, "teacher.endpoint.concurrency=1", "teacher.batch_size=1")
    stub.close()
    assert "HTTP 401: invalid api key in the middle of the run; it wants a key: set teacher.endpoint.api_key_env" \
        in str(failure.value)
    assert len(stub.requests) == 3  # no retries of an auth failure, and no batch sent after it


def test_a_scoring_request_the_server_refuses_ends_the_run_with_its_reason(local_ray, tmp_path):
    """A prompt can be set aside; a sequence to score cannot (every pair needs its scores): one line naming the
    sequence and the server's words, and the rows already scored are kept pending for the resume."""
    import pyarrow.parquet as pq
    import ray

    from openai_stub import Stub
    from plad_ray.config import EndpointConfig, TeacherEngineConfig
    from plad_ray.generate.endpoint_scores import scores_http
    from plad_ray.generate.endpoint_worker import write_from_endpoint
    from plad_ray.teacher_logprobs import SCORE_SCHEMA

    def completions(body):
        if body["prompt"][0] == 13:
            return 400, {"error": {"message": "This model's maximum context length is 64 tokens"}}
        ids = body["prompt"]
        top = {str(t): {"logprob": -0.5 * r, "rank": r} for r, t in enumerate((40, 41), 1)}
        return 200, {"choices": [{"prompt_logprobs": [None] + [{**top, str(t): {"logprob": -3.0, "rank": 9}}
                                                               for t in ids[1:]]}], "usage": {"prompt_tokens": len(ids)}}

    stub = Stub(completions, None)
    engine = TeacherEngineConfig(model="stub-teacher", batch_size=4, score_top_k=2,
                                 endpoint=EndpointConfig(url=stub.url, concurrency=1))
    rows = [{"id": f"p{i:02d}", "sample_index": 0, "side": "rejected", "prompt_len": 2,
             "tokenized_prompt": [i, 7, 8, 9]} for i in range(16)]
    uri = str(tmp_path / "teacher_scores")
    with pytest.raises(RuntimeFailure) as failure:
        write_from_endpoint(lambda stats: scores_http(ray.data.from_items(rows), engine, stats), uri, SCORE_SCHEMA, 4,
                            "16 teacher scores")
    stub.close()
    line = str(failure.value)
    assert "\n" not in line
    assert line.startswith(f"teacher endpoint {stub.url}: scoring sequence (p13, 0, rejected) refused (HTTP 400: "
                           "This model's maximum context length is 64 tokens); every pair needs its teacher scores; "), line
    safe = re.search(rf"; (\d+) of 16 teacher scores are safe on disk in {uri}; re-run the same command to resume$",
                     line)
    assert safe, line
    written = [r for f in parquet.written_files(uri) for r in pq.read_table(f).to_pylist()]
    assert len(written) == int(safe.group(1)) and "p13" not in {r["id"] for r in written}
    assert all(r["logprobs"] == [-3.0, -3.0] and r["topk_ids"] == [40, 41, 40, 41] for r in written)
