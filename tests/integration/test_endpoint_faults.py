"""A black-box teacher misbehaving, on a stub OpenAI server on loopback: the real request workers (a Ray Data
actor pool on a local Ray cluster) and the real teacher step. Status codes vLLM's own server does not give
(429 with Retry-After, per-prompt 400s, 401 mid-run, a 503 spell) come from the stub; a real server killed
and restarted is in tests/integration/test_http_teacher.py."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest
from support.openai_stub import send_json, serve

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
                    answer = (
                        200,
                        {},
                        {
                            "choices": [{"text": text, "finish_reason": "stop", "stop_reason": None}],
                            "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(text)},
                        },
                    )
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

    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            "teacher.model=stub-teacher",
            f"teacher.endpoint.url={stub.url}",
            "teacher.endpoint.retry_wait_s=0.1",
            "teacher.batch_size=4",
            "student.model=unused",
            f"data.prompts={tmp_path / 'p.jsonl'}",
            *sets,
        ],
    )
    ds = ray.data.from_items([{"id": f"p{i:02d}", "prompt": p} for i, p in enumerate(prompts)])
    lines = []
    inputs = Inputs(prompts=ds.materialize(), num_prompts=len(prompts))
    figures = generate_teacher(cfg.teacher, cfg.context(), inputs, log=lines.append)
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
    safe = re.search(
        r"; (\d+) of 12 teacher outputs are safe on disk in (\S+); re-run the same command to resume$", line
    )
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
    assert (
        "HTTP 401: invalid api key in the middle of the run; it wants a key: set teacher.endpoint.api_key_env"
        in str(failure.value)
    )
    assert len(stub.requests) == 3  # no retries of an auth failure, and no batch sent after it


def test_a_scoring_request_the_server_refuses_ends_the_run_with_its_reason(local_ray, tmp_path):
    """A prompt can be set aside; a sequence to score cannot (every pair needs its scores): one line naming the
    sequence and the server's words, and the rows already scored are kept pending for the resume."""
    import pyarrow.parquet as pq

    stub, line, uri = _score_sixteen(tmp_path, 400, "This model's maximum context length is 64 tokens")
    assert line.startswith(
        f"teacher endpoint {stub.url}: scoring sequence (p13, 0, rejected) refused (HTTP 400: "
        "This model's maximum context length is 64 tokens); every pair needs its teacher scores; "
    ), line
    safe = re.search(
        rf"; (\d+) of 16 teacher scores are safe on disk in {uri}; re-run the same command to resume$", line
    )
    assert safe, line
    written = [r for f in parquet.written_files(uri) for r in pq.read_table(f).to_pylist()]
    assert len(written) == int(safe.group(1)) and "p13" not in {r["id"] for r in written}
    assert all(r["logprobs"] == [-3.0, -3.0] and r["topk_ids"] == [40, 41, 40, 41] for r in written)


def _set_aside(run_dir, folder="teacher") -> dict:
    records = {}
    for file in (run_dir / "quarantine" / folder).glob("*.jsonl"):
        for line in file.read_text().splitlines():
            record = json.loads(line)
            records[record["id"]] = record
    return records


def test_a_poisoned_prompt_is_set_aside_after_its_retries_and_the_run_finishes(local_ray, tmp_path):
    """The issue's case: the server answers HTTP 500 to one prompt of 12 and the other 11 at once (max_retries 2,
    max_outage_s 120). The run ends normally with 11 teacher rows and the prompt in quarantine/teacher/, after
    3 requests of it spaced by the backoff; nothing counts as down time; a re-run asks nothing."""
    poison = PROMPTS[5]
    stub = Stub(
        lambda n, prompt: (
            (500, {}, {"error": {"message": "internal error: tensor shape"}}) if prompt == poison else None
        )
    )
    figures, lines, table = run(tmp_path, stub, "teacher.endpoint.max_retries=2", "teacher.endpoint.max_outage_s=120")
    assert table.num_rows == 11 and sorted(table.column("prompt").to_pylist()) == [p for p in PROMPTS if p != poison]
    sent = [t for t, p in stub.requests if p == poison]
    assert len(sent) == 3  # max_retries + 1
    gaps = [b - a for a, b in zip(sent, sent[1:])]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2, gaps  # retry_wait_s 0.1, then doubled
    aside = _set_aside(tmp_path / "run")
    assert list(aside) == ["p05"]
    assert aside["p05"] == {
        "id": "p05",
        "prompt": poison,
        "status": 500,
        "kind": "failed",
        "requests": 3,
        "reason": "HTTP 500: internal error: tensor shape",
    }
    assert not (tmp_path / "run" / "quarantine" / "teacher.partial").exists()
    e = figures["teacher_endpoint"]
    assert e["failed"] == 1 and e["refused"] == 0 and e["canaries"] == 1 and e["retries"] == 2
    assert e["requests"] == 11 + 3 + 1 == len(stub.requests)  # the canary: an answered prompt sent again
    # The endpoint answered the canary: the prompt's 0.3 s of failures are not down time (at most the instant
    # between its first 500 and a batch-mate's answer is).
    assert e["outage_s"] < 0.05, e
    assert figures["teacher_generated"] == 11
    assert figures["teacher_tokens"] == sum(len(p) for p in PROMPTS if p != poison)  # the outputs', not the canary's
    assert lines[-1].endswith(
        f"0.0 s down (no request answered); usage {e['prompt_tokens']} prompt + "
        f"{e['completion_tokens']} completion tokens; 1 prompts failed while the endpoint "
        f"answered the others, set aside with their last error in "
        f"{tmp_path / 'run' / 'quarantine' / 'teacher'}"
    ), lines[-1]
    asked = len(stub.requests)
    figures, lines, table = run(tmp_path, stub, "teacher.endpoint.max_retries=2")
    stub.close()
    assert len(stub.requests) == asked and table.num_rows == 11 and figures["teacher_cached"] == 11
    assert any(
        "1 prompts whose requests kept failing while it answered others are not asked again" in line for line in lines
    ), lines


def test_a_prompt_that_times_out_is_set_aside_without_down_time(local_ray, tmp_path):
    """A prompt the server takes past teacher.endpoint.timeout_s while it answers the others at once: retried with
    backoff like a 5xx (the worker does not stop sending for it), set aside after max_retries + 1 requests."""
    slow = PROMPTS[2]

    def script(n, prompt):
        if prompt == slow:
            time.sleep(1.5)  # past the 0.5 s time-out; the answer then goes to a closed connection
        return None

    stub = Stub(script)
    figures, lines, table = run(tmp_path, stub, "teacher.endpoint.max_retries=1", "teacher.endpoint.timeout_s=0.5")
    stub.close()
    assert table.num_rows == 11 and slow not in table.column("prompt").to_pylist()
    assert sum(p == slow for p in stub.prompts()) == 2  # max_retries + 1
    aside = _set_aside(tmp_path / "run")
    assert aside == {
        "p02": {
            "id": "p02",
            "prompt": slow,
            "status": None,
            "kind": "failed",
            "requests": 2,
            "reason": "request timed out (teacher.endpoint.timeout_s)",
        }
    }
    e = figures["teacher_endpoint"]
    assert e["failed"] == 1 and e["canaries"] == 1 and e["polls"] == 0  # no /models poll: not taken for an outage
    assert e["outage_s"] < 0.05, e


def test_a_503_spell_after_answers_sets_nothing_aside(local_ray, tmp_path):
    """The endpoint answers, then fails everyone for 2 s: retries spent during the spell ask a canary, which
    fails too, so it is an outage (counted as down), not 8 poisoned prompts; every prompt is answered."""
    spell = []

    def script(n, prompt):
        if n < 4:
            return None
        spell.append(spell[0] if spell else time.monotonic())
        return (503, {}, {"error": {"message": "overloaded"}}) if time.monotonic() - spell[0] < 2.0 else None

    stub = Stub(script)
    figures, lines, table = run(
        tmp_path,
        stub,
        "teacher.endpoint.concurrency=1",
        "teacher.endpoint.max_retries=1",
        "teacher.endpoint.max_outage_s=60",
    )
    stub.close()
    assert sorted(table.column("prompt").to_pylist()) == PROMPTS
    e = figures["teacher_endpoint"]
    assert e["failed"] == 0 and e["canaries"] >= 1 and not _set_aside(tmp_path / "run")
    assert 1.5 <= e["outage_s"] <= 30, e
    assert "failed while the endpoint answered" not in lines[-1]


def test_a_refusal_storm_stops_the_run_and_sets_nothing_aside_for_good(local_ray, tmp_path):
    """Four answers, then two 404s among four (under the storm line), then 404 for everything: the run stops with
    one line naming the status and the server's words; the two prompts refused before the storm are not kept
    either, and the re-run asks them again."""
    gone = {"error": {"message": "The model `stub-teacher` does not exist.", "code": 404}}
    stub = Stub(lambda n, prompt: None if n < 4 or n in (6, 7) else (404, {}, gone))
    with pytest.raises(RuntimeFailure) as failure:
        run(
            tmp_path,
            stub,
            "teacher.endpoint.concurrency=1",
            "teacher.endpoint.refused_window=4",
            "teacher.endpoint.max_refused_fraction=0.5",
        )
    line = str(failure.value)
    assert "\n" not in line
    assert re.match(
        rf"teacher endpoint {stub.url}: 3 of the last 4 answers were refusals \(most: HTTP 404: The model "
        r"`stub-teacher` does not exist\.\), more than teacher\.endpoint\.max_refused_fraction=0\.5 of "
        r"teacher\.endpoint\.refused_window=4: a refusal storm, the server's doing, not the prompts': "
        r"nothing this run refused is set aside, a re-run asks those prompts again; (\d+) of 12 teacher "
        r"outputs are safe on disk in \S+; re-run the same command to resume$",
        line,
    ), line
    refused_before = {p for n, (_, p) in enumerate(stub.requests) if n in (4, 5)}
    assert len(refused_before) == 2
    assert not _set_aside(tmp_path / "run") and not (tmp_path / "run" / "quarantine" / "teacher.partial").exists()
    # A run that died before it could discard (Ctrl-C) leaves its verdicts pending: the next run drops them too.
    pending = tmp_path / "run" / "quarantine" / "teacher.partial"
    pending.mkdir(parents=True)
    (pending / "left.jsonl").write_text(
        json.dumps({"id": "p11", "prompt": PROMPTS[11], "status": 404, "reason": "HTTP 404: gone", "kind": "refused"})
        + "\n"
    )
    stub.script = lambda n, prompt: None
    asked = len(stub.requests)
    figures, lines, table = run(tmp_path, stub)
    stub.close()
    assert sorted(table.column("prompt").to_pylist()) == PROMPTS and not _set_aside(tmp_path / "run")
    assert refused_before <= set(stub.prompts()[asked:])  # asked again
    assert len(stub.requests) - asked == figures["teacher_generated"] == 12 - figures["teacher_cached"]
    assert "[generate] teacher: 1 prompts an unfinished run set aside are asked again" in "\n".join(lines)
    assert not pending.exists()


def test_a_poisoned_scoring_sequence_ends_the_run_after_its_retries(local_ray, tmp_path):
    """A sequence cannot be set aside: one whose requests fail while the endpoint answers a canary ends the run
    with one line naming it and the server's last words, after max_retries + 1 requests."""
    stub, line, uri = _score_sixteen(tmp_path, 502, "upstream worker crashed", max_retries=2, retry_wait_s=0.1)
    assert line.startswith(
        f"teacher endpoint {stub.url}: scoring sequence (p13, 0, rejected) failed 3 times while "
        "the endpoint answered others (HTTP 502: upstream worker crashed); every pair needs its "
        "teacher scores; "
    ), line
    assert re.search(rf"; \d+ of 16 teacher scores are safe on disk in {uri}; re-run the same command to resume$", line)
    assert sum(body["prompt"][0] == 13 for _, body in stub.requests) == 3  # max_retries + 1


def _score_sixteen(tmp_path, status: int, message: str, **endpoint):
    """Score 16 sequences (p00..p15) through the request workers against a stub whose answer to p13 is always
    `status` with `message`; the run must end with a RuntimeFailure: (the stub, its one line, the scores' folder)."""
    import ray
    from support.openai_stub import Stub

    from plad_ray.config import EndpointConfig, TeacherEngineConfig
    from plad_ray.generate.endpoint_scores import scores_http
    from plad_ray.generate.endpoint_stats import write_from_endpoint
    from plad_ray.generate.schemas import SCORE_SCHEMA

    def completions(body):
        ids = body["prompt"]
        if ids[0] == 13:
            return status, {"error": {"message": message}}
        top = {str(t): {"logprob": -0.5 * r, "rank": r} for r, t in enumerate((40, 41), 1)}
        logprobs = [None] + [{**top, str(t): {"logprob": -3.0, "rank": 9}} for t in ids[1:]]
        return 200, {"choices": [{"prompt_logprobs": logprobs}], "usage": {"prompt_tokens": len(ids)}}

    stub = Stub(completions, None)
    engine = TeacherEngineConfig(
        model="stub-teacher",
        batch_size=4,
        score_top_k=2,
        endpoint=EndpointConfig(url=stub.url, concurrency=1, **endpoint),
    )
    rows = [
        {"id": f"p{i:02d}", "sample_index": 0, "side": "rejected", "prompt_len": 2, "tokenized_prompt": [i, 7, 8, 9]}
        for i in range(16)
    ]
    uri = str(tmp_path / "teacher_scores")
    with pytest.raises(RuntimeFailure) as failure:
        write_from_endpoint(
            lambda stats: scores_http(ray.data.from_items(rows), engine, stats),
            uri,
            SCORE_SCHEMA,
            4,
            "16 teacher scores",
        )
    stub.close()
    line = str(failure.value)
    assert "\n" not in line
    return stub, line, uri
