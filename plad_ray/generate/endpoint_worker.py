"""The request workers of a black-box teacher: a Ray Data actor pool posting each prompt to the endpoint.

    prompts (id, prompt) --EndpointWorker x concurrency--> teacher rows (pairs.TEACHER_SCHEMA)
                                  |--> quarantine/teacher/*.jsonl  prompts the server refused, with why
                                  +--> EndpointStats (one actor): usage, requests, retries, throttles, outages

Written here rather than through ray.data.llm's HTTP processor (which this project used first):
that processor retries each request a fixed number of times and then fails the whole stage, so
a server restart ends a week-long run; it reads no `Retry-After`, cannot set one refused prompt
aside, and keeps no account of usage. Ray Data still owns what it does well: streaming, batching,
the actor pool and the restart of a dead actor. The decisions are pure functions
(plad_ray.generate.endpoint_policy); this file only does the I/O.
"""

import asyncio
import json
import os
import time
import uuid
from collections import Counter, deque

from plad_ray.config import EngineConfig
from plad_ray.errors import RuntimeFailure
from plad_ray.generate.endpoint import models_url, read_response
from plad_ray.generate.endpoint_policy import (FAILING, FATAL, OK, REFUSED, THROTTLED, AdaptiveRate, Outage,
                                               backoff_s, classify, error_text, retry_after_s)

RATE_WINDOW_S = 10.0  # how far back a worker looks to measure the rate it was sending at


class EndpointFailure(RuntimeFailure):
    """The endpoint cannot serve the run: down past the budget, throttled past it, or the key refused."""


class EndpointStats:
    """One actor summing what every request worker reports after each batch (driver reads `report`)."""

    def __init__(self):
        self.counts = Counter()
        self.outages: list[tuple[float, float]] = []  # wall-clock (start, end) per worker outage
        self.failure: str | None = None  # the first EndpointFailure's line (Ray Data wraps the exception itself)

    def add(self, counts: dict, outages: list, failure: str | None = None) -> None:
        self.counts.update(counts)
        self.outages.extend(outages)
        self.failure = self.failure or failure

    def first_failure(self) -> str | None:
        return self.failure

    def report(self) -> dict:
        return {**{k: round(v, 3) if isinstance(v, float) else v for k, v in self.counts.items()},
                "outage_s": round(union_length(self.outages), 3)}


def union_length(intervals) -> float:
    """Seconds covered by at least one (start, end) interval: workers down at the same time count once."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


class EndpointWorker:
    """A Ray Data callable class: one batch of prompts in, their teacher rows out (refused ones set aside)."""

    def __init__(self, engine: EngineConfig, params: dict, model_name: str, params_json: str,
                 quarantine_uri: str, stats, log_prefix: str = "[generate] teacher endpoint"):
        self.engine, self.endpoint = engine, engine.endpoint
        self.params, self.model_name, self.params_json = params, model_name, params_json
        self.quarantine_uri, self.stats, self.prefix = quarantine_uri, stats, log_prefix
        self.url = self.endpoint.url  # where requests go (a ScoringWorker posts to the completions URL)
        self.rate = AdaptiveRate(cap=self.endpoint.qps)
        self.outage = Outage(self.endpoint.max_outage_s)
        self.breaker_open = False  # stop sending until /models answers again
        self.polls_ok = 0  # how many polls found the endpoint up (waiters compare against it)
        self.announced = False  # the log said "down since" for the outage now open
        self.sent = deque()
        self.loop = asyncio.new_event_loop()
        self.lock = asyncio.Lock()
        self.counts, self.outages = Counter(), []
        self.failure: str | None = None  # once set, every later batch fails at once (see __call__)

    # -- the batch -------------------------------------------------------------------------------

    def __call__(self, table):
        import pyarrow as pa

        if self.failure is not None:
            # Ray Data has already queued more batches on this actor; they must not send anything either.
            raise EndpointFailure(self.failure)
        rows = table.to_pylist()
        try:
            results = self.loop.run_until_complete(self._batch(rows))
        except EndpointFailure as e:
            self.failure = str(e)
            self._flush(failure=self.failure)
            raise
        self._flush()
        kept = [r for r in results if r["status"] == OK]
        refused = [r for r in results if r["status"] == REFUSED]
        if refused:
            self.set_aside(refused)
        schema = self.schema()
        return pa.Table.from_pylist([r["row"] for r in kept], schema=schema) if kept else schema.empty_table()

    # -- what a request is: a teacher output here; the teacher's prompt log-probs in ScoringWorker ---

    def schema(self):
        from plad_ray.pairs import TEACHER_SCHEMA

        return TEACHER_SCHEMA

    def payload(self, row: dict) -> dict:
        from plad_ray.data.prompts import engine_prompt

        return {"model": self.engine.model, **engine_prompt(row["prompt"], self.engine.chat_template), **self.params}

    def read(self, row: dict, response: dict) -> dict | str:
        """The output row of an answered request, or why the answer cannot be used (the prompt is set aside)."""
        out = read_response(response, stop_configured=self.engine.sampling.stop is not None)
        if not out["text"] and not self.endpoint.allow_empty:
            return "empty completion (teacher.endpoint.allow_empty is false)"
        return {"id": row["id"], "prompt": row["prompt"], "teacher_text": out["text"],
                "teacher_num_tokens": out["num_tokens"], "teacher_finish_reason": out["finish_reason"],
                "teacher_token_ids": None,  # only text crosses from a black-box teacher
                "teacher_model": self.model_name, "teacher_sampling": self.params_json}

    def set_aside(self, refused: list[dict]) -> None:
        self._quarantine(refused)

    async def _batch(self, rows):
        import aiohttp

        headers = {}
        if self.endpoint.api_key_env:
            key = os.environ.get(self.endpoint.api_key_env)
            if not key:
                raise EndpointFailure(f"teacher.endpoint.api_key_env: ${self.endpoint.api_key_env} is not set on this "
                                      "Ray worker; set it in the cluster's environment or the job's runtime_env")
            headers["Authorization"] = f"Bearer {key}"
        timeout = aiohttp.ClientTimeout(total=self.endpoint.timeout_s)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            return await asyncio.gather(*(self._one(session, row) for row in rows))

    def _flush(self, failure: str | None = None) -> None:
        import ray

        counts, outages = dict(self.counts), list(self.outages)
        self.counts, self.outages = Counter(), []
        if counts or outages or failure:
            ray.get(self.stats.add.remote(counts, outages, failure))

    # -- one prompt ------------------------------------------------------------------------------

    async def _one(self, session, row: dict) -> dict:
        payload = self.payload(row)
        attempt, throttles, throttled_since = 0, 0, None
        while True:
            if self.breaker_open:
                await self._wait_until_up(session)
            await self._pace()
            sent_at = time.monotonic()
            status, body, retry_after, error = await self._post(session, payload)
            now = time.monotonic()
            kind = classify(status, retry_after is not None)
            if kind == OK:
                return self._answered(row, body, now)
            text = error_text(status, body, error)
            if kind == FATAL:
                fix = (f"check the key in ${self.endpoint.api_key_env}" if self.endpoint.api_key_env else
                       "it wants a key: set teacher.endpoint.api_key_env")
                raise EndpointFailure(f"teacher endpoint {self.endpoint.url}: {text} in the middle of the run; {fix}")
            if kind == REFUSED:
                self._close_outage(now)
                self.counts["refused"] += 1
                return {"status": REFUSED, "row": row, "http_status": status, "message": text}
            if kind == THROTTLED:
                self._close_outage(now)
                throttled_since = throttled_since or now
                wait = retry_after_s(retry_after, time.time())
                wait = backoff_s(throttles, self.endpoint.retry_wait_s) if wait is None else wait
                if now + wait - throttled_since > self.endpoint.max_outage_s:
                    raise EndpointFailure(f"teacher endpoint {self.endpoint.url}: throttled ({text}) for "
                                          f"{now - throttled_since:.0f} s, more than teacher.endpoint.max_outage_s="
                                          f"{self.endpoint.max_outage_s:g}")
                self.rate.throttled(now, sent_at, self._observed_rate(now))
                throttles += 1
                self.counts["throttled"] += 1
                self.counts["throttle_wait_s"] += wait
                await asyncio.sleep(wait)
                continue
            assert kind == FAILING
            self.outage.failed(now, text)
            if self.outage.over_budget(now):
                raise self._past_budget(now)
            if status is None or attempt >= self.endpoint.max_retries:
                # No answer at all, or the retries are spent: stop sending, poll /models instead.
                self.breaker_open = True
                attempt = 0
                self.counts["retries"] += 1
                continue
            self.counts["retries"] += 1
            await asyncio.sleep(backoff_s(attempt, self.endpoint.retry_wait_s))
            attempt += 1

    async def _post(self, session, payload):
        import aiohttp

        self.counts["requests"] += 1
        self.sent.append(time.monotonic())
        try:
            async with session.post(self.url, json=payload) as response:
                return response.status, await response.text(), response.headers.get("Retry-After"), None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            return None, "", None, e

    async def _pace(self) -> None:
        wait = self.rate.acquire(time.monotonic())
        if wait > 0:
            await asyncio.sleep(wait)

    def _observed_rate(self, now: float) -> float:
        """Requests/s sent over the last RATE_WINDOW_S (over at least 1 s: a first burst counts as its size)."""
        while self.sent and now - self.sent[0] > RATE_WINDOW_S:
            self.sent.popleft()
        return len(self.sent) / max(1.0, now - self.sent[0]) if self.sent else 0.0

    def _answered(self, row: dict, body: str, now: float) -> dict:
        response = json.loads(body)
        self._close_outage(now)
        usage = response.get("usage") or {}
        self.counts["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
        self.counts["completion_tokens"] += int(usage.get("completion_tokens") or 0)
        out = self.read(row, response)
        if isinstance(out, str):
            self.counts["refused"] += 1
            return {"status": REFUSED, "row": row, "http_status": 200, "message": out}
        self.counts["outputs"] += 1
        return {"status": OK, "row": out}

    # -- outages ---------------------------------------------------------------------------------

    def _close_outage(self, now: float) -> None:
        lasted = self.outage.close(now)
        self.breaker_open = False
        if lasted is None:
            return
        wall_now = time.time()
        self.outages.append((wall_now - lasted, wall_now))
        if self.announced:
            print(f"{self.prefix} {self.endpoint.url} back after {lasted:.0f} s", flush=True)
            self.announced = False

    async def _wait_until_up(self, session) -> None:
        """The circuit breaker: one coroutine polls /models with backoff; the batch's others wait for it."""
        seen = self.polls_ok
        async with self.lock:
            if self.polls_ok != seen or not self.breaker_open:
                return  # another request found the endpoint up meanwhile
            now = time.monotonic()
            if not self.announced:
                self.announced = True
                since = time.strftime("%H:%M:%S", time.localtime(time.time() - self.outage.length(now)))
                print(f"{self.prefix} {self.endpoint.url} down since {since} ({self.outage.last_error}); "
                      f"waiting for it (budget {self.endpoint.max_outage_s:g} s, teacher.endpoint.max_outage_s)",
                      flush=True)
            poll = 0
            while True:
                now = time.monotonic()
                if self.outage.over_budget(now):
                    raise self._past_budget(now)
                left = self.endpoint.max_outage_s - self.outage.length(now)
                await asyncio.sleep(max(0.0, min(backoff_s(poll, self.endpoint.retry_wait_s), left + 0.01)))
                poll += 1
                self.counts["polls"] += 1
                status, error = await self._get_models(session)
                if status is not None and status < 500:
                    self.polls_ok += 1
                    self.breaker_open = False  # half-open: requests flow; the next answer closes the outage
                    return
                self.outage.failed(time.monotonic(), error_text(status, "", error))

    async def _get_models(self, session):
        import aiohttp

        try:
            async with session.get(models_url(self.endpoint.url)) as response:
                await response.read()
                return response.status, None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            return None, e

    def _past_budget(self, now: float) -> EndpointFailure:
        lasted = self.outage.length(now)
        self.outages.append((time.time() - lasted, time.time()))
        return EndpointFailure(f"teacher endpoint {self.endpoint.url}: down for {lasted:.0f} s, more than "
                               f"teacher.endpoint.max_outage_s={self.endpoint.max_outage_s:g} (last error: "
                               f"{self.outage.last_error})")

    # -- refused prompts -------------------------------------------------------------------------

    def _quarantine(self, refused: list[dict]) -> None:
        from plad_ray.data import storage

        lines = [json.dumps({"id": r["row"]["id"], "prompt": r["row"]["prompt"], "status": r["http_status"],
                             "reason": r["message"]}) for r in refused]
        name = f"{uuid.uuid4().hex}.jsonl"
        storage.write_text(storage.join(self.quarantine_uri, name), "\n".join(lines) + "\n")
        for r in refused:
            print(f"{self.prefix} refused prompt {r['row']['id']} ({r['message']}); set aside in "
                  f"{self.quarantine_uri}", flush=True)


def refused_ids(quarantine_uri: str) -> dict[str, str]:
    """Prompt ids an earlier run set aside as refused by the endpoint, with the reason."""
    from plad_ray.data import storage

    fs, path = storage.filesystem_and_path(quarantine_uri)
    refused = {}
    for file in storage.list_files(fs, path, quarantine_uri):
        if file.endswith(".jsonl"):
            with fs.open_input_stream(file) as f:
                for line in f.read().decode().splitlines():
                    if line.strip():
                        record = json.loads(line)
                        refused[record["id"]] = record["reason"]
    return refused


ENDPOINT_FIGURES = ("requests", "retries", "polls", "throttled", "throttle_wait_s", "outage_s", "refused",
                    "prompt_tokens", "completion_tokens")


def write_from_endpoint(rows_of, uri: str, schema, rows_per_file: int, total: str) -> dict:
    """The rows request workers make (`rows_of(stats)`: a dataset of them, its workers reporting to `stats`)
    into `uri`'s pending files; what the workers counted (ENDPOINT_FIGURES). An outage past the budget (or a
    revoked key) ends the run with one line: the endpoint, the last error, how many of `total` are safe, how
    to go on."""
    import ray

    from plad_ray.data import parquet

    stats = ray.remote(num_cpus=0)(EndpointStats).remote()
    try:
        parquet.write_pending(rows_of(stats), uri, schema, rows_per_file)
    except Exception:
        failure = ray.get(stats.first_failure.remote())  # what a request worker said; Ray Data wraps its exception
        if failure is None:
            raise
        raise RuntimeFailure(f"{failure}; {parquet.written_rows(uri)} of {total} are safe on disk in {uri}; "
                             "re-run the same command to resume") from None
    finally:
        report = ray.get(stats.report.remote())
        ray.kill(stats)
    return {key: report.get(key, 0) for key in ENDPOINT_FIGURES}
