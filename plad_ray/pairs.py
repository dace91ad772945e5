"""Pseudo-preference pairs: the teacher's output is preferred over the student's.

PLaD's label is the capacity gap itself: for a prompt x, a teacher output y_T is
assumed better than a student output y_S (y_T > y_S), with no annotation and no
teacher internals. Pure functions over plain rows, so they test without Ray or vLLM.

Pairs use TRL's preference-dataset columns (`prompt`, `chosen`, `rejected`, plain
strings) so other tools read them; the remaining columns record where each side came
from (the Parquet schemas: plad_ray.generate.schemas, beside the stages that write them).
"""

import hashlib
import json

import numpy as np
import pyarrow as pa

FINISH_REASONS = ("eos", "stop", "length")


def finish_reason(num_generated_tokens: int, max_tokens: int, last_token_id: int | None, eos_token_ids) -> str:
    """How an output ended: 'eos' (the model emitted its end-of-sequence token), 'length' (cut
    at max_tokens), or 'stop' (a stop string ended it; vLLM keeps the token that completed the
    stop string in the ids and drops the string from the text).

    ray.data.llm does not carry vLLM's finish_reason through, so it is recovered from what it
    does carry: the generated ids. Only an output that ended on EOS is trained to end on EOS.
    """
    if last_token_id is not None and last_token_id in set(eos_token_ids):
        return "eos"
    if num_generated_tokens >= max_tokens:
        return "length"
    return "stop"


def sampling_json(sampling: dict) -> str:
    return json.dumps(sampling, sort_keys=True)


def is_heldout(prompt_id: str, fraction: float) -> bool:
    """Deterministic split by prompt id (stable across runs, rounds and machines)."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(prompt_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def expand_samples(row: dict, num_samples: int) -> list[dict]:
    """One row per student sample of a prompt, numbered 0..k-1."""
    return [{**row, "sample_index": k} for k in range(num_samples)]


def make_pair(
    row: dict,
    student: dict,
    student_model: str,
    student_sampling: str,
    heldout_fraction: float,
    shared_vocabulary: bool = False,
) -> dict:
    """One pair from a teacher-cache row plus one student generation.

    With `shared_vocabulary` (teacher and student tokenizers map ids to the same tokens) the
    teacher's generated ids are kept for scoring; otherwise only its text crosses.
    """
    teacher_ids = row.get("teacher_token_ids")
    return {
        "id": row["id"],
        "sample_index": int(row["sample_index"]),
        "prompt": row["prompt"],
        "chosen": row["teacher_text"],
        "rejected": student["text"],
        "chosen_num_tokens": int(row["teacher_num_tokens"]),
        "rejected_num_tokens": int(student["num_tokens"]),
        "chosen_finish_reason": row["teacher_finish_reason"],
        "rejected_finish_reason": student["finish_reason"],
        "chosen_token_ids": _ids(teacher_ids) if shared_vocabulary and teacher_ids is not None else None,
        "rejected_token_ids": _ids(student["token_ids"]),
        "teacher_model": row["teacher_model"],
        "student_model": student_model,
        "teacher_sampling": row["teacher_sampling"],
        "student_sampling": student_sampling,
        "heldout": is_heldout(row["id"], heldout_fraction),
    }


def _ids(ids) -> list[int]:
    return [int(i) for i in ids]


def with_training_order(batch: dict, seed: int) -> dict:
    """The batch with an `order` column: a seeded position that depends only on each pair's key (id and
    sample_index). Sorting by it shuffles the pairs the same way whatever order Ray Data read them in
    (generation writes blocks as they are ready), so a run, and a re-run resumed from a checkpoint, train
    the same pairs at the same step."""
    ids = batch["id"]
    samples = batch["sample_index"] if "sample_index" in batch else [0] * len(ids)
    order = [
        int.from_bytes(hashlib.sha256(f"{seed}:{i}:{s}".encode()).digest()[:8], "big") >> 1
        for i, s in zip(ids, samples)
    ]
    return {**batch, "order": np.asarray(order, dtype=np.int64)}


def prompt_id(prompt: str) -> str:
    """The id of a prompt that came without one: 16 hex digits of its text's SHA-256."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def with_training_columns(batch: dict, heldout_fraction: float) -> dict:
    """Pairs from elsewhere (TRL's prompt/chosen/rejected) with the columns training reads.

    A missing id is the prompt's: a hash of the prompt text (stable across runs), so every pair
    of one prompt gets the same id and falls on the same side of the held-out split, as the
    engine's own pairs do (their id is the prompt id). Missing finish reasons are "eos" (the
    response is complete, so its EOS is scored); a missing `heldout` is the usual split by id.
    Their text is tokenized by the student's tokenizer, except where the file has plad-ray's
    `chosen_token_ids`/`rejected_token_ids` columns (pairs this engine wrote for the same student
    tokenizer): those ids are kept.
    """
    n = len(batch["prompt"])
    out = {k: list(batch[k]) for k in ("prompt", "chosen", "rejected")}
    if "id" in batch:
        out["id"] = [str(i) for i in batch["id"]]
    else:
        out["id"] = [prompt_id(prompt) for prompt in out["prompt"]]
    out["sample_index"] = [int(k) for k in batch["sample_index"]] if "sample_index" in batch else [0] * n
    for side in ("chosen", "rejected"):
        key = f"{side}_finish_reason"
        out[key] = list(batch[key]) if key in batch else ["eos"] * n
    out["heldout"] = (
        list(batch["heldout"]) if "heldout" in batch else [is_heldout(i, heldout_fraction) for i in out["id"]]
    )
    for key in ("chosen_token_ids", "rejected_token_ids"):
        if key in batch:
            out[key] = [token_ids(v) for v in batch[key]]
    return out


def token_ids(value) -> list[int] | None:
    """A token-id column's value as a list, or None where it is null (None, NA or NaN, as data frames
    and Ray Data batches spell a missing list)."""
    if value is None or not hasattr(value, "__len__") or isinstance(value, str):
        return None
    return _ids(value)


def response_ids(generated_ids, text: str, finish_reason: str, encode, eos: list[int], stop: str | None) -> list[int]:
    """The ids a response is scored on (in training and by the teacher's scoring): as generated when known, else its
    text tokenized by `encode`, with the stop string that ended it (which vLLM leaves out of the text) or the EOS
    it ended on (plad_ray.train.batching)."""
    generated = token_ids(generated_ids)
    if generated is not None:
        return generated
    if finish_reason == "stop" and stop:
        return encode(text + stop)
    return encode(text) + (eos if finish_reason == "eos" else [])


def int64_sample_index(table):
    """A pyarrow batch with its sample_index as int64: Ray Data's joins hash int32 and int64 keys apart."""

    column = table.schema.get_field_index("sample_index")
    return table.set_column(column, "sample_index", table.column("sample_index").cast(pa.int64()))
