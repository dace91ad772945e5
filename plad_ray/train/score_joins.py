"""The teacher's scores of the pairs (teacher_scores/, teacher.score_samples) joined onto them for training: the
teacher scorer's per-side means (train.scorer=teacher) and the top-k of the objectives that read it. Ray Data
joins; a pair without its scores is an error, not a pair dropped."""

import numpy as np

from plad_ray import pairs
from plad_ray.data import parquet
from plad_ray.errors import DataError
from plad_ray.generate import schemas


def with_teacher_scores(pairs_ds, scores_uri: str, pairs_rows: int):
    """Pairs with `chosen_score` / `rejected_score`: the teacher's mean log-prob per token of each side, from
    teacher_scores/ (train.scorer=teacher)."""
    means = (
        _read_scores(scores_uri)
        .select_columns(["id", "sample_index", "side", "logprobs"])
        .map_batches(_mean_logprobs, batch_format="numpy")
    )
    return _join_scores(pairs_ds, means, {"score": "{side}_score"}, ("chosen", "rejected"), scores_uri, pairs_rows)


def with_teacher_topk(
    pairs_ds,
    scores_uri: str,
    pairs_rows: int,
    sides: tuple[str, ...],
    student_rows: int,
    source: str = "teacher scores",
):
    """Pairs with the teacher's top-k of `sides` (batching.TOPK_COLUMNS) from teacher_scores/, for the
    objectives trained on them (onpolicy_kd: the samples; contrastive: both sides). Every id joined must
    index one of the student's `student_rows` logits (`source` names the folder in the refusal)."""
    names = {"topk_ids": "{side}_topk_ids", "topk_logprobs": "{side}_topk_logps", "num_tokens": "{side}_topk_tokens"}
    joined = _join_scores(pairs_ds, _read_scores(scores_uri), names, sides, scores_uri, pairs_rows)
    # a Ray Data aggregation over the materialised join: one number per block, one to the driver
    largest = joined.map_batches(
        _largest_topk_id, fn_kwargs={"columns": [f"{side}_topk_ids" for side in sides]}, batch_format="pyarrow"
    ).max("largest_id")
    if largest is not None and largest >= student_rows:
        raise DataError(
            f"{source} {scores_uri}: top-k id {largest} is past the student's {student_rows} embedding "
            f"rows (ids 0 to {student_rows - 1}), so its log-prob has no student logit: these scores come "
            "from a teacher with a larger vocabulary; score the pairs with a teacher of the student's "
            "vocabulary, or train on the pairs' text (hinge, logistic, seqkd)"
        )
    return joined


def _largest_topk_id(table, columns: list[str]):
    """The block's largest id over the top-k list `columns`, -1 when they hold none."""
    import pyarrow as pa
    import pyarrow.compute as pc

    found = [pc.max(pc.list_flatten(table[c])).as_py() for c in columns]
    return pa.table({"largest_id": pa.array([max((v for v in found if v is not None), default=-1)], pa.int64())})


def _read_scores(scores_uri: str):
    scores_ds = parquet.read(scores_uri)
    if scores_ds is None:
        raise DataError(
            f"teacher scores {scores_uri}: missing or incomplete; train.scorer=teacher and the top-k "
            "objectives need teacher.score_samples=true in the run that made the pairs (re-run "
            "jobs.generate_pairs with it)"
        )
    parquet.require_columns(
        scores_uri, schemas.SCORES_READ_BY_TRAINING, "teacher scores", "score the pairs again with this plad-ray"
    )
    return scores_ds


def _join_scores(pairs_ds, scores_ds, names: dict, sides: tuple[str, ...], scores_uri: str, pairs_rows: int):
    """Pairs joined with columns of each side's score rows (renamed by `names`, "{side}" filled in): the
    sample's on (id, sample_index), the teacher output's on id. A pair without its scores is an error, not
    a pair dropped."""
    from ray.data.expressions import col

    partitions = 1 + pairs_rows // parquet.JOIN_ROWS_PER_PARTITION
    # given pairs (train.pairs) read through pandas carry an int64 sample_index, the scores an int32 one
    joined = pairs_ds.map_batches(pairs.int64_sample_index, batch_format="pyarrow")
    for side in sides:
        keys = ("id", "sample_index") if side == "rejected" else ("id",)
        rows = (
            scores_ds.filter(expr=col("side") == side)
            .select_columns([*keys, *names])
            .rename_columns({name: new.format(side=side) for name, new in names.items()})
        )
        if side == "rejected":
            rows = rows.map_batches(pairs.int64_sample_index, batch_format="pyarrow")
        joined = joined.join(rows, "inner", num_partitions=partitions, on=keys)
    joined = joined.materialize()
    if joined.count() != pairs_rows:
        raise DataError(
            f"teacher scores {scores_uri}: {pairs_rows - joined.count()} of {pairs_rows} pairs have no "
            "teacher scores; re-run jobs.generate_pairs with teacher.score_samples=true to score them"
        )
    return joined


def _mean_logprobs(batch: dict) -> dict:
    means = [float(np.mean(lp)) if len(lp) else 0.0 for lp in batch["logprobs"]]
    return {
        "id": batch["id"],
        "sample_index": batch["sample_index"],
        "side": batch["side"],
        "score": np.asarray(means, dtype=np.float32),
    }
