"""Prompts a black-box teacher set aside, one JSON line each (id, prompt, status, reason, kind):
refused (a 4xx, an empty completion) or failed (its requests kept failing while the endpoint answered a canary).

    request workers --write--> quarantine/teacher.partial/*.jsonl   this run's verdicts, pending
    the stage ends normally --promote--> quarantine/teacher/*.jsonl  final: a re-run does not ask them again
    the stage fails (a refusal storm, an outage, a crash) --discard--> the re-run asks them again

Pending until the stage ends because a verdict is only as good as the run that made it: a refusal storm
(a balancer or a model swap answering 404 for a minute) refuses good prompts, and the run it stops must not
keep them. Asking a prompt again costs one request (max_retries + 1 for a failed one); setting a good one
aside for good loses it without a word. A run that dies before its end (Ctrl-C, a driver crash) cannot
discard: the next run of the stage does, before it asks anything.
"""

import json
import os
import uuid

from plad_ray.data import storage

REFUSED, FAILED = "refused", "failed"  # the `kind` of a record (records without one, from older runs: refused)


def pending_uri(uri: str) -> str:
    return uri.rstrip("/") + ".partial"


def write(uri: str, records: list[dict]) -> None:
    """One file of records into the pending place of `uri` (one file per batch: no two writers share one)."""
    lines = [json.dumps(r) for r in records]
    storage.write_text(storage.join(pending_uri(uri), f"{uuid.uuid4().hex}.jsonl"), "\n".join(lines) + "\n")


def read(uri: str) -> dict[str, dict]:
    """The records under `uri` (final, or `pending_uri(uri)`) by prompt id."""
    fs, path = storage.filesystem_and_path(uri)
    records = {}
    for file in storage.list_files(fs, path, uri):
        if file.endswith(".jsonl"):
            with fs.open_input_stream(file) as f:
                for line in f.read().decode().splitlines():
                    if line.strip():
                        record = json.loads(line)
                        records[record["id"]] = {"kind": REFUSED, **record}
    return records


def discard(uri: str) -> int:
    """Drop the pending verdicts of `uri` (a run that did not end normally); how many prompts they held."""
    pending = pending_uri(uri)
    held = len(read(pending))
    storage.remove(pending)
    return held


def promote(uri: str) -> int:
    """Make the pending verdicts of `uri` final (one move per file); how many prompts they hold."""
    pending = pending_uri(uri)
    fs, src = storage.filesystem_and_path(pending)
    files = storage.list_files(fs, src, pending)
    if not files:
        return 0
    held = len(read(pending))
    _, dst = storage.filesystem_and_path(uri)
    fs.create_dir(dst, recursive=True)
    for file in files:
        fs.move(file, f"{dst}/{os.path.basename(file)}")
    storage.remove(pending)
    return held
