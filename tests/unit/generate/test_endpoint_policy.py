"""Pure tests of what a request worker does with a black-box teacher's answers (endpoint_policy)."""

import email.utils
import math

import pytest

from plad_ray.generate.endpoint_policy import (
    FAILING,
    FATAL,
    MAX_BACKOFF_S,
    MIN_QPS,
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
    timed_out,
    unreachable,
)
from plad_ray.generate.endpoint_stats import union_length


@pytest.mark.parametrize(
    "status, retry_after, kind",
    [
        (200, False, OK),
        (201, False, OK),
        (401, False, FATAL),
        (403, False, FATAL),
        (429, False, THROTTLED),
        (429, True, THROTTLED),
        (503, True, THROTTLED),
        (503, False, FAILING),
        (500, False, FAILING),
        (502, False, FAILING),
        (408, False, FAILING),
        (None, False, FAILING),
        (400, False, REFUSED),
        (404, False, REFUSED),
        (413, False, REFUSED),
        (422, False, REFUSED),
    ],
)
def test_classify(status, retry_after, kind):
    assert classify(status, retry_after) == kind


def test_retry_after_in_seconds_or_as_a_date():
    assert retry_after_s("7", now=0.0) == 7.0
    assert retry_after_s(" 1.5 ", now=0.0) == 1.5
    assert retry_after_s("-3", now=0.0) == 0.0
    date = email.utils.formatdate(1_000_030.0, usegmt=True)
    assert retry_after_s(date, now=1_000_000.0) == pytest.approx(30.0)
    assert retry_after_s(date, now=1_000_100.0) == 0.0  # a date in the past: no wait
    assert retry_after_s(None, now=0.0) is None
    assert retry_after_s("soon", now=0.0) is None


def test_backoff_doubles_up_to_the_cap():
    assert [backoff_s(a, 1.0) for a in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff_s(10, 1.0) == MAX_BACKOFF_S
    assert backoff_s(10_000, 0.5) == MAX_BACKOFF_S


def test_error_text_names_the_cause():
    assert error_text(503, '{"error": {"message": "model is  loading"}}') == "HTTP 503: model is loading"
    assert (
        error_text(400, '{"object": "error", "message": "prompt too long", "code": 400}') == "HTTP 400: prompt too long"
    )
    assert error_text(502, "<html>bad gateway</html>") == "HTTP 502: <html>bad gateway</html>"
    assert error_text(None, exception=ConnectionRefusedError(111, "Connect call failed")).startswith(
        "connection refused"
    )
    assert error_text(None, exception=TimeoutError()) == "request timed out (teacher.endpoint.timeout_s)"


def test_rate_paces_requests_at_the_cap():
    rate = AdaptiveRate(cap=2.0)
    assert [rate.acquire(now=10.0) for _ in range(4)] == [0.0, 0.5, 1.0, 1.5]
    assert rate.acquire(now=20.0) == 0.0  # idle: no debt carried over


def test_rate_halves_on_throttle_and_recovers_after_quiet_periods():
    rate = AdaptiveRate(cap=8.0, quiet_s=30.0)
    rate.throttled(now=0.0, sent_at=-0.1, observed_rate=8.0)
    assert rate.rate == 4.0
    rate.throttled(now=0.2, sent_at=-0.05, observed_rate=8.0)
    assert rate.rate == 4.0  # sent before the cut: the same signal, not a second halving
    rate.throttled(now=1.0, sent_at=0.5, observed_rate=4.0)
    assert rate.rate == 2.0
    rate.acquire(now=20.0)
    assert rate.rate == 2.0  # not yet quiet for 30 s
    rate.acquire(now=31.0)
    assert rate.rate == 4.0  # one quiet period: doubled
    rate.acquire(now=61.0)
    assert rate.rate == 8.0 and rate.last_throttle is None  # back at the cap, never above it
    rate.acquire(now=1000.0)
    assert rate.rate == 8.0


def test_an_uncapped_rate_starts_from_what_was_being_sent_and_returns_to_no_cap():
    rate = AdaptiveRate(cap=None, quiet_s=10.0)
    assert rate.acquire(now=0.0) == 0.0 and math.isinf(rate.rate)
    rate.throttled(now=0.0, sent_at=0.0, observed_rate=6.0)
    assert rate.rate == 3.0
    for i in range(1, 11):
        rate.throttled(now=float(i), sent_at=float(i), observed_rate=0.0)
    assert rate.rate == MIN_QPS  # never below the floor
    rate.acquire(now=10_000.0)
    assert math.isinf(rate.rate)


def test_outage_budget_runs_from_the_first_failure_until_an_answer():
    outage = Outage(budget_s=60.0)
    assert not outage.over_budget(now=1e9) and outage.close(now=5.0) is None
    outage.failed(now=100.0, error="connection refused")
    outage.failed(now=150.0, error="HTTP 503")
    assert outage.last_error == "HTTP 503" and outage.length(now=150.0) == 50.0
    assert not outage.over_budget(now=160.0)
    assert outage.over_budget(now=160.5)
    assert outage.close(now=161.0) == 61.0
    assert outage.since is None and not outage.over_budget(now=1e9)


def test_outage_seconds_count_overlapping_workers_once():
    assert union_length([]) == 0.0
    assert union_length([(0, 10), (5, 12), (20, 25)]) == 17.0
    assert union_length([(5, 6), (0, 10)]) == 10.0


def test_a_prompt_gets_max_retries_plus_one_requests_spaced_by_the_backoff():
    retries = Retries(max_retries=2, first_wait_s=0.5)
    # request 1 fails: wait 0.5; request 2 fails: wait 1.0; request 3 fails: spent (None), ask a canary
    assert [retries.failed() for _ in range(3)] == [0.5, 1.0, None]
    assert retries.failures == 3  # = max_retries + 1 requests, all failed


def test_an_outage_forgives_the_failures_but_not_the_backoff():
    retries = Retries(max_retries=2, first_wait_s=0.5)
    assert [retries.failed() for _ in range(3)] == [0.5, 1.0, None]
    retries.outage()  # the canary failed too: the endpoint's failures, not the prompt's
    assert retries.failures == 0
    # two more retries, their waits carrying on from 1.0: 2.0, 4.0 (not 0.5 again)
    assert [retries.failed() for _ in range(3)] == [2.0, 4.0, None]


def test_no_retries_means_one_request():
    retries = Retries(max_retries=0, first_wait_s=1.0)
    assert retries.failed() is None and retries.failures == 1


def test_a_canary_asks_for_one_token_of_an_answered_request():
    payload = {"model": "m", "prompt": "hi", "max_tokens": 256, "temperature": 0.7, "seed": 3}
    assert canary_payload(payload) == {"model": "m", "prompt": "hi", "max_tokens": 1, "temperature": 0.7, "seed": 3}
    assert payload["max_tokens"] == 256  # the request itself is not changed


def test_a_storm_is_more_than_the_fraction_of_the_window_refused():
    window = RefusalWindow(size=4, max_fraction=0.5)  # a storm: more than 0.5 x 4 = 2 of the last 4 answers
    window.add((400, "HTTP 400: content filter"))
    window.add((404, "HTTP 404: no such model"))
    assert window.storm() is None  # 2 refusals: not more than 2
    window.add(None)  # a completion
    window.add((404, "HTTP 404: model x not found"))
    assert window.storm() == "3 of the last 4 answers were refusals (most: HTTP 404: model x not found)"
    window.add(None)  # the 400 leaves the window: 404, None, 404, None
    assert window.storm() is None and len(window.answers) == 4


def test_a_storm_needs_more_refusals_than_the_share_of_a_full_window():
    window = RefusalWindow(size=10, max_fraction=0.5)
    for _ in range(5):
        window.add((404, "HTTP 404: gone"))
    assert window.storm() is None  # 5 of 5 answers, but not more than 0.5 x 10: a few early refusals are no storm
    window.add((404, "HTTP 404: gone"))
    assert window.storm() == "6 of the last 6 answers were refusals (most: HTTP 404: gone)"


def test_a_storm_names_the_commonest_status_with_its_latest_message():
    window = RefusalWindow(size=5, max_fraction=0.2)  # more than 1 refusal in 5
    for refusal in [
        (404, "HTTP 404: first"),
        (400, "HTTP 400: a"),
        (404, "HTTP 404: second"),
        (404, "HTTP 404: third"),
        (400, "HTTP 400: b"),
    ]:
        window.add(refusal)
    # three 404s, two 400s: the 404's latest words, though a 400 came last
    assert window.storm() == "5 of the last 5 answers were refusals (most: HTTP 404: third)"


def test_a_fraction_of_one_never_stops():
    window = RefusalWindow(size=3, max_fraction=1.0)
    for _ in range(10):
        window.add((404, "HTTP 404: gone"))
    assert window.storm() is None  # 3 of 3 is not more than 1 x 3


def test_a_time_out_is_retried_like_a_5xx_and_an_unreachable_server_waited_for():
    import asyncio

    import aiohttp

    assert unreachable(None, ConnectionRefusedError(111, "Connect call failed"))
    assert unreachable(None, aiohttp.ServerDisconnectedError())
    assert not unreachable(None, asyncio.TimeoutError())  # the server took the request and did not answer in time
    assert not unreachable(None, aiohttp.ServerTimeoutError("read timed out"))
    assert not unreachable(500, None) and not unreachable(503, None)
    assert timed_out(aiohttp.ServerTimeoutError()) and not timed_out(None)
