"""What a request worker does with each answer of a black-box teacher: pure decisions, no I/O.

    answer --classify--> ok | refused (this prompt only) | throttled | failing | fatal
    throttled: wait Retry-After (or back off), halve the worker's rate; a quiet period doubles it back
    failing:   back off and retry (server unreachable: stop sending and poll /models first); after
               max_retries + 1 failed requests (`Retries`) the worker sends a canary, a request the
               endpoint answered before: answered, the prompt is set aside as failed with its last
               error; not answered, it is an outage and the prompt gets its retries again
    outage:    the budget (max_outage_s) runs from the first failure since the last answer to any
               request; past it the run ends, unless a canary is answered
    refused:   the prompt is set aside in quarantine/ with the status and message; the run goes on,
               unless more than max_refused_fraction of the last answers are refusals (`RefusalWindow`):
               a storm (a model swap, a misrouted balancer) stops the run, and nothing it refused is kept
    fatal:     401/403: the key is wrong or revoked; the run stops at once

The clock is passed in, so every rule is tested with plain numbers (tests/unit/generate/test_endpoint_policy.py).
"""

import email.utils
import math
from collections import Counter, deque
from dataclasses import dataclass, field

OK, REFUSED, THROTTLED, FAILING, FATAL = "ok", "refused", "throttled", "failing", "fatal"
FAILED = "failed"  # the verdict on a prompt whose requests kept failing while the endpoint answered a canary
AUTH = (401, 403)
RETRYABLE_4XX = (408, 425, 429)
MAX_BACKOFF_S = 30.0  # the longest wait between two retries, or two polls of /models
MIN_QPS = 0.1  # a throttled worker never goes below one request every 10 s


def classify(status: int | None, has_retry_after: bool = False) -> str:
    """What an HTTP status (None: no answer — connection refused, reset, timed out) means for the request."""
    if status is None:
        return FAILING
    if 200 <= status < 300:
        return OK
    if status in AUTH:
        return FATAL
    if status == 429 or (status == 503 and has_retry_after):
        return THROTTLED
    if status in RETRYABLE_4XX or status >= 500:
        return FAILING
    if 400 <= status < 500:
        return REFUSED
    return FAILING  # 1xx/3xx that the client did not follow: treat as a server fault


def retry_after_s(value: str | None, now: float) -> float | None:
    """Seconds a `Retry-After` header asks for (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return None if when is None else max(0.0, when.timestamp() - now)


def backoff_s(attempt: int, first_wait_s: float) -> float:
    """Exponential backoff: first_wait_s, then doubling, at most MAX_BACKOFF_S (attempt counts from 0)."""
    return min(MAX_BACKOFF_S, first_wait_s * 2 ** min(attempt, 30))


def timed_out(exception: BaseException | None) -> bool:
    """A request with no answer within teacher.endpoint.timeout_s (aiohttp's ServerTimeoutError is a TimeoutError)."""
    return isinstance(exception, TimeoutError) or type(exception).__name__ in ("TimeoutError", "ServerTimeoutError")


def unreachable(status: int | None, exception: BaseException | None) -> bool:
    """No answer because the server could not be reached (refused, reset, cut off): stop sending until /models
    answers. A time-out is not that: the server took the request, and it is retried like a 5xx."""
    return status is None and not timed_out(exception)


def error_text(status: int | None, body: str = "", exception: BaseException | None = None) -> str:
    """The shortest true account of a failed request: `HTTP 503: <message>` or `connection refused`."""
    if status is None:
        text = str(exception) if exception is not None else "no answer"
        causes = (exception, getattr(exception, "os_error", None), getattr(exception, "__cause__", None))
        if any(isinstance(c, ConnectionRefusedError) for c in causes) or "refused" in text.lower():
            return f"connection refused ({text})"
        if timed_out(exception):
            return "request timed out (teacher.endpoint.timeout_s)"
        return f"{type(exception).__name__ if exception is not None else 'error'}: {text}"
    message = _message(body)
    return f"HTTP {status}" + (f": {message}" if message else "")


def _message(body: str) -> str:
    """The server's own words from an OpenAI-style error body (FastAPI's `detail` too), or the start of the body."""
    import json

    try:
        data = json.loads(body)
        error = data.get("error", data) if isinstance(data, dict) else data
        message = (error.get("message") or error.get("detail") or "") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        message = body
    return " ".join(str(message).split())[:300]


@dataclass
class AdaptiveRate:
    """A worker's request rate: at most `cap` requests/s (None: no cap), halved on every throttle,
    doubled back after each `quiet_s` without one. `acquire` says how long to wait before sending."""

    cap: float | None = None
    quiet_s: float = 30.0
    rate: float = math.inf
    last_throttle: float | None = None
    last_cut: float = -math.inf  # when the rate was last halved
    next_slot: float = 0.0

    def __post_init__(self):
        self.rate = self.cap if self.cap is not None else math.inf

    def acquire(self, now: float) -> float:
        """Reserve the next send slot; the seconds to wait for it (0 when free)."""
        self._recover(now)
        if math.isinf(self.rate):
            return 0.0
        slot = max(now, self.next_slot)
        self.next_slot = slot + 1.0 / self.rate
        return slot - now

    def throttled(self, now: float, sent_at: float, observed_rate: float) -> None:
        """The server throttled a request sent at `sent_at`: halve the rate (from what was being sent, when
        there was no limit), once per round: throttles of requests sent before the last cut are the same signal."""
        self.last_throttle = now
        if sent_at < self.last_cut:
            return
        base = self.rate if not math.isinf(self.rate) else max(observed_rate, 2 * MIN_QPS)
        self.rate = max(MIN_QPS, base / 2)
        self.last_cut = now

    def _recover(self, now: float) -> None:
        if self.last_throttle is None:
            return
        while now - self.last_throttle >= self.quiet_s:
            self.last_throttle += self.quiet_s
            self.rate *= 2
            if self.cap is not None and self.rate >= self.cap:
                self.rate, self.last_throttle = self.cap, None
                return
            if self.cap is None and self.rate >= 1e6:
                self.rate, self.last_throttle = math.inf, None
                return


@dataclass
class Outage:
    """How long the endpoint has failed: from the first failure since the last good answer.
    `over_budget` is the rule that ends the run; any good answer (a completion) closes the outage."""

    budget_s: float
    since: float | None = None
    last_error: str = ""

    def failed(self, now: float, error: str) -> None:
        if self.since is None:
            self.since = now
        self.last_error = error

    def length(self, now: float) -> float:
        return 0.0 if self.since is None else now - self.since

    def over_budget(self, now: float) -> bool:
        return self.since is not None and now - self.since > self.budget_s

    def close(self, now: float) -> float | None:
        """A good answer came: the outage is over; how long it lasted (None when there was none)."""
        lasted = None if self.since is None else now - self.since
        self.since, self.last_error = None, ""
        return lasted


@dataclass
class Retries:
    """One prompt's failed requests. Each failure waits the next backoff; the failure after `max_retries`
    retries has no wait (None): the worker then asks whether the endpoint answers others (a canary).
    If it does not, `outage` forgives the failures (the endpoint's, not the prompt's); the backoff keeps
    growing, so an outage is not hammered."""

    max_retries: int
    first_wait_s: float
    failures: int = 0  # failed requests that count against the prompt (since the last outage)
    attempt: int = 0  # backoff index: every wait of this prompt so far

    def failed(self) -> float | None:
        """A request of this prompt failed: the seconds to wait before the next one, or None: retries spent."""
        self.failures += 1
        if self.failures > self.max_retries:
            return None
        wait = backoff_s(self.attempt, self.first_wait_s)
        self.attempt += 1
        return wait

    def outage(self) -> None:
        """The canary failed too, or there was none: the endpoint fails everyone; the prompt retries afresh."""
        self.failures = 0


def canary_payload(payload: dict) -> dict:
    """An answered request sent again to ask "does the endpoint answer others?": one token is enough."""
    return {**payload, "max_tokens": 1}


@dataclass
class RefusalWindow:
    """A worker's last `size` answers (a completion, or a refusal with its status and message). More than
    `max_fraction` x `size` refusals among them is a storm: a server that refuses everything for a while
    (404 from a balancer or a model swap), which says nothing about the prompts it refused."""

    size: int
    max_fraction: float
    answers: deque = field(default_factory=deque)  # (status, text) of a refusal, None of a completion

    def add(self, refusal: tuple[int | None, str] | None) -> None:
        self.answers.append(refusal)
        if len(self.answers) > self.size:
            self.answers.popleft()

    def storm(self) -> str | None:
        """None, or what the storm is: how many of the last answers were refusals, and the most common status
        with its latest message (`HTTP 404: model not found`)."""
        refusals = [r for r in self.answers if r is not None]
        if len(refusals) <= self.max_fraction * self.size:
            return None
        status = Counter(s for s, _ in refusals).most_common(1)[0][0]
        text = next(t for s, t in reversed(refusals) if s == status)
        return f"{len(refusals)} of the last {len(self.answers)} answers were refusals (most: {text})"


def verdict(result: dict) -> str:
    """Why a prompt (or a scoring sequence) was not answered: `refused (HTTP 400: ...)` or `failed 3 times ...`."""
    if result["status"] == FAILED:
        return f"failed {result['requests']} times while the endpoint answered others ({result['message']})"
    return f"refused ({result['message']})"
