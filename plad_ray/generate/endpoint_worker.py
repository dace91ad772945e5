"""The request workers of a black-box teacher: a Ray Data actor pool posting each prompt to the endpoint.

    prompts (id, prompt) --EndpointWorker x concurrency--> teacher rows (schemas.TEACHER_SCHEMA)
                                  |--> quarantine/teacher.partial/  prompts refused or failed, with why
                                  |                                 (pending until the stage ends: set_aside.py)
                                  +--> EndpointStats (one actor, endpoint_stats.py): usage, requests, retries, ...

Written here rather than through ray.data.llm's HTTP processor (which this project used first):
that processor retries each request a fixed number of times and then fails the whole stage, so
a server restart ends a week-long run; it reads no `Retry-After`, cannot set one refused prompt
aside, and keeps no account of usage. Ray Data still owns what it does well: streaming, batching,
the actor pool and the restart of a dead actor. The decisions are pure functions
(plad_ray.generate.endpoint_policy); this file only does the I/O.

A prompt whose requests keep failing is told apart from an endpoint that is down by a canary: the
worker sends a request the endpoint answered before (one token). Answered, the prompt is set aside
as failed; not answered, the endpoint fails everyone, and the outage budget decides. Neither the
failing prompt's retries nor a /models poll can tell the two apart: the poll answers while the
completions fail, and the prompt's batch-mates have all been answered by then.
"""

import asyncio
import json
import os
import time
from collections import Counter, deque

from plad_ray.config import EngineConfig
from plad_ray.errors import RuntimeFailure
from plad_ray.generate import set_aside
from plad_ray.generate.endpoint import models_url, read_response
from plad_ray.generate.endpoint_policy import (
    FAILED,
    FAILING,
    FATAL,
    OK,
    REFUSED,
    THROTTLED,
    AdaptiveRate,
    Outage,
    RefusalWindow,
    Retries,
    backoff_s,
    canary_payload,
    classify,
    error_text,
    retry_after_s,
    unreachable,
    verdict,
)

RATE_WINDOW_S = 10.0  # how far back a worker looks to measure the rate it was sending at


class EndpointFailure(RuntimeFailure):
    """The endpoint cannot serve the run: down past the budget, throttled past it, refusing most requests,
    or the key refused."""


class EndpointWorker:
    """A Ray Data callable class: one batch of prompts in, their teacher rows out (refused or failed ones set
    aside)."""

    def __init__(
        self,
        engine: EngineConfig,
        params: dict,
        model_name: str,
        params_json: str,
        quarantine_uri: str,
        stats,
        log_prefix: str = "[generate] teacher endpoint",
    ):
        self.engine, self.endpoint = engine, engine.endpoint
        self.params, self.model_name, self.params_json = params, model_name, params_json
        self.quarantine_uri, self.stats, self.prefix = quarantine_uri, stats, log_prefix
        self.url = self.endpoint.url  # where requests go (a ScoringWorker posts to the completions URL)
        self.rate = AdaptiveRate(cap=self.endpoint.qps)
        self.outage = Outage(self.endpoint.max_outage_s)
        self.breaker_open = False  # stop sending until /models answers again
        self.polls_ok = 0  # how many polls found the endpoint up (waiters compare against it)
        self.announced = False  # the log said "down since" for the outage now open
        self.canary: dict | None = None  # the last answered request, to send again (canary_payload)
        self.canary_lock = asyncio.Lock()  # one canary at a time; the others wait for its answer
        self.last_canary: tuple[float, bool] | None = None  # (when sent, answered) of the last canary
        self.refusals = RefusalWindow(self.endpoint.refused_window, self.endpoint.max_refused_fraction)
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
        aside = [r for r in results if r["status"] != OK]
        if aside:
            self.set_aside(aside)
        schema = self.schema()
        return pa.Table.from_pylist([r["row"] for r in kept], schema=schema) if kept else schema.empty_table()

    # -- what a request is: a teacher output here; the teacher's prompt log-probs in ScoringWorker ---

    def schema(self):
        from plad_ray.generate.schemas import TEACHER_SCHEMA

        return TEACHER_SCHEMA

    def payload(self, row: dict) -> dict:
        from plad_ray.data.prompts import engine_prompt

        return {"model": self.engine.model, **engine_prompt(row["prompt"], self.engine.chat_template), **self.params}

    def read(self, row: dict, response: dict) -> dict | str:
        """The output row of an answered request, or why the answer cannot be used (the prompt is set aside)."""
        out = read_response(response, stop_configured=self.engine.sampling.stop is not None)
        if not out["text"] and not self.endpoint.allow_empty:
            return "empty completion (teacher.endpoint.allow_empty is false)"
        return {
            "id": row["id"],
            "prompt": row["prompt"],
            "teacher_text": out["text"],
            "teacher_num_tokens": out["num_tokens"],
            "teacher_finish_reason": out["finish_reason"],
            "teacher_token_ids": None,  # only text crosses from a black-box teacher
            "teacher_model": self.model_name,
            "teacher_sampling": self.params_json,
        }

    def set_aside(self, results: list[dict]) -> None:
        """Refused or failed prompts to the pending place: final only if the stage ends normally (set_aside.py)."""
        set_aside.write(
            self.quarantine_uri,
            [
                {
                    "id": r["row"]["id"],
                    "prompt": r["row"]["prompt"],
                    "status": r["http_status"],
                    "reason": r["message"],
                    "kind": r["status"],
                    **({"requests": r["requests"]} if r["status"] == FAILED else {}),
                }
                for r in results
            ],
        )
        for r in results:
            print(f"{self.prefix} prompt {r['row']['id']} {verdict(r)}; set aside in {self.quarantine_uri}", flush=True)

    async def _batch(self, rows):
        import aiohttp

        headers = {}
        if self.endpoint.api_key_env:
            key = os.environ.get(self.endpoint.api_key_env)
            if not key:
                raise EndpointFailure(
                    f"teacher.endpoint.api_key_env: ${self.endpoint.api_key_env} is not set on this "
                    "Ray worker; set it in the cluster's environment or the job's runtime_env"
                )
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
        retries = Retries(self.endpoint.max_retries, self.endpoint.retry_wait_s)
        throttles, throttled_since = 0, None
        while True:
            if self.breaker_open:
                await self._wait_until_up(session)
            await self._pace()
            sent_at = time.monotonic()
            status, body, retry_after, error = await self._post(session, payload)
            now = time.monotonic()
            kind = classify(status, retry_after is not None)
            if kind == OK:
                return self._answered(row, payload, body, now)
            text = error_text(status, body, error)
            if kind == FATAL:
                raise self._fatal(text)
            if kind == REFUSED:
                self._close_outage(now)
                return self._refused(row, status, text)
            if kind == THROTTLED:
                self._close_outage(now)
                throttled_since = throttled_since or now
                wait = retry_after_s(retry_after, time.time())
                wait = backoff_s(throttles, self.endpoint.retry_wait_s) if wait is None else wait
                if now + wait - throttled_since > self.endpoint.max_outage_s:
                    raise EndpointFailure(
                        f"teacher endpoint {self.endpoint.url}: throttled ({text}) for "
                        f"{now - throttled_since:.0f} s, more than teacher.endpoint.max_outage_s="
                        f"{self.endpoint.max_outage_s:g}"
                    )
                self.rate.throttled(now, sent_at, self._observed_rate(now))
                throttles += 1
                self.counts["throttled"] += 1
                self.counts["throttle_wait_s"] += wait
                await asyncio.sleep(wait)
                continue
            assert kind == FAILING
            self.outage.failed(now, text)
            if self.outage.over_budget(now) and not await self._answers_others(session, now):
                raise self._past_budget(time.monotonic())
            wait = retries.failed()
            if wait is None:  # the retries are spent: the prompt's fault, or the endpoint's?
                if await self._answers_others(session, sent_at):
                    self.counts["failed"] += 1
                    return {
                        "status": FAILED,
                        "row": row,
                        "http_status": status,
                        "message": text,
                        "requests": retries.failures,
                    }
                retries.outage()
                self.breaker_open = True  # the endpoint fails everyone: wait for it as for one that does not answer
            elif unreachable(status, error):
                self.breaker_open = True  # the server cannot be reached: stop sending, poll /models instead
            self.counts["retries"] += 1
            if not self.breaker_open:
                await asyncio.sleep(wait)

    async def _answers_others(self, session, since: float) -> bool:
        """Whether the endpoint answers a request other than one that failed after being sent at `since`: the
        answer to a canary sent after `since` (by this request or another that asked first). False when this
        worker has had no answer yet: there is nothing to ask with, and its failures count as an outage."""
        async with self.canary_lock:
            if self.last_canary is not None and self.last_canary[0] >= since:
                return self.last_canary[1]
            if self.canary is None:
                return False
            await self._pace()
            sent_at = time.monotonic()
            self.counts["canaries"] += 1
            status, body, _, error = await self._post(session, self.canary)
            now = time.monotonic()
            kind = classify(status)
            if kind == FATAL:
                raise self._fatal(error_text(status, body, error))
            if kind == OK:
                self._usage(json.loads(body))
                self._close_outage(now, counted=False)  # the endpoint answered all along: not down time
            elif kind == FAILING:
                self.outage.failed(now, error_text(status, body, error))
            self.last_canary = (sent_at, kind == OK)
            return kind == OK

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

    def _answered(self, row: dict, payload: dict, body: str, now: float) -> dict:
        response = json.loads(body)
        self._close_outage(now)
        self._usage(response)
        out = self.read(row, response)
        if isinstance(out, str):
            return self._refused(row, 200, out)
        self.canary = canary_payload(payload)
        self.refusals.add(None)
        self.counts["outputs"] += 1
        return {"status": OK, "row": out}

    def _usage(self, response: dict) -> None:
        usage = response.get("usage") or {}
        self.counts["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
        self.counts["completion_tokens"] += int(usage.get("completion_tokens") or 0)

    def _refused(self, row: dict, status: int, text: str) -> dict:
        """A refusal sets its prompt aside, unless it makes a storm: then the run stops, and the pending verdicts
        of this run are discarded (set_aside.py), the storm's and those before it."""
        self.counts["refused"] += 1
        self.refusals.add((status, text))
        storm = self.refusals.storm()
        if storm:
            raise EndpointFailure(
                f"teacher endpoint {self.url}: {storm}, more than teacher.endpoint.max_refused_fraction="
                f"{self.refusals.max_fraction:g} of teacher.endpoint.refused_window={self.refusals.size}: a refusal "
                "storm, the server's doing, not the prompts': nothing this run refused is set aside, a re-run asks "
                "those prompts again"
            )
        return {"status": REFUSED, "row": row, "http_status": status, "message": text}

    def _fatal(self, text: str) -> EndpointFailure:
        fix = (
            f"check the key in ${self.endpoint.api_key_env}"
            if self.endpoint.api_key_env
            else "it wants a key: set teacher.endpoint.api_key_env"
        )
        return EndpointFailure(f"teacher endpoint {self.endpoint.url}: {text} in the middle of the run; {fix}")

    # -- outages ---------------------------------------------------------------------------------

    def _close_outage(self, now: float, counted: bool = True) -> None:
        """An answer came: the outage clock stops. Its time counts as down unless `counted` is false (a canary's
        answer after one prompt's failures) and the workers never stopped sending for it."""
        lasted = self.outage.close(now)
        self.breaker_open = False
        if lasted is None:
            return
        wall_now = time.time()
        if counted or self.announced:
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
                print(
                    f"{self.prefix} {self.endpoint.url} down since {since} ({self.outage.last_error}); "
                    f"waiting for it (budget {self.endpoint.max_outage_s:g} s, teacher.endpoint.max_outage_s)",
                    flush=True,
                )
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
        return EndpointFailure(
            f"teacher endpoint {self.endpoint.url}: down for {lasted:.0f} s with no request "
            f"answered, more than teacher.endpoint.max_outage_s={self.endpoint.max_outage_s:g} "
            f"(last error: {self.outage.last_error})"
        )
