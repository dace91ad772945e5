"""Pure tests of what a request worker does with a black-box teacher's answers (endpoint_policy)."""

import email.utils
import math

import pytest

from plad_ray.generate.endpoint_policy import (FAILING, FATAL, MAX_BACKOFF_S, MIN_QPS, OK, REFUSED, THROTTLED,
                                               AdaptiveRate, Outage, backoff_s, classify, error_text, retry_after_s)
from plad_ray.generate.endpoint_worker import union_length


@pytest.mark.parametrize("status, retry_after, kind", [
    (200, False, OK), (201, False, OK),
    (401, False, FATAL), (403, False, FATAL),
    (429, False, THROTTLED), (429, True, THROTTLED), (503, True, THROTTLED),
    (503, False, FAILING), (500, False, FAILING), (502, False, FAILING), (408, False, FAILING), (None, False, FAILING),
    (400, False, REFUSED), (404, False, REFUSED), (413, False, REFUSED), (422, False, REFUSED),
])
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
    assert error_text(400, '{"object": "error", "message": "prompt too long", "code": 400}') == \
        "HTTP 400: prompt too long"
    assert error_text(502, "<html>bad gateway</html>") == "HTTP 502: <html>bad gateway</html>"
    assert error_text(None, exception=ConnectionRefusedError(111, "Connect call failed")).startswith(
        "connection refused")
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
