"""What the request workers of one stage counted, summed in one actor, and the stage's driver side.

write_from_endpoint: the workers' rows -> `<uri>.partial` (plad_ray.data.parquet); their counts
(ENDPOINT_FIGURES, for report.json) from the EndpointStats actor; a worker's failure as one line
"""

from collections import Counter

from plad_ray.errors import RuntimeFailure


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
        return {
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in self.counts.items()},
            "outage_s": round(union_length(self.outages), 3),
        }


def union_length(intervals) -> float:
    """Seconds covered by at least one (start, end) interval: workers down at the same time count once."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


ENDPOINT_FIGURES = (
    "requests",
    "retries",
    "polls",
    "canaries",
    "throttled",
    "throttle_wait_s",
    "outage_s",
    "refused",
    "failed",
    "prompt_tokens",
    "completion_tokens",
)


def write_from_endpoint(rows_of, uri: str, schema, rows_per_file: int, total: str) -> dict:
    """The rows request workers make (`rows_of(stats)`: a dataset of them, its workers reporting to `stats`)
    into `uri`'s pending files; what the workers counted (ENDPOINT_FIGURES). An outage past the budget, a refusal
    storm or a revoked key ends the run with one line: the endpoint, what it did, how many of `total` are safe,
    how to go on."""
    import ray

    from plad_ray.data import parquet

    stats = ray.remote(num_cpus=0)(EndpointStats).remote()
    try:
        parquet.write_pending(rows_of(stats), uri, schema, rows_per_file)
    except Exception:
        failure = ray.get(stats.first_failure.remote())  # what a request worker said; Ray Data wraps its exception
        if failure is None:
            raise
        raise RuntimeFailure(
            f"{failure}; {parquet.written_rows(uri)} of {total} are safe on disk in {uri}; "
            "re-run the same command to resume"
        ) from None
    finally:
        report = ray.get(stats.report.remote())
        ray.kill(stats)
    return {key: report.get(key, 0) for key in ENDPOINT_FIGURES}
