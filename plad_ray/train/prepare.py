"""Pairs -> token ids for training (Ray Data): the student's tokenizer, the fixed training order, the held-out
split, and the counts of every pair by what happened to it.

Held-out pairs (the `heldout` column, a deterministic split by prompt id) are scored before, during and after
training; the rest are trained on. Pairs where teacher and student wrote the same text carry no ranking signal:
they are trained on only when the objective has an NLL or per-token part (plad_ray.objectives), are left out of
every ranking figure, and are counted. Listwise training groups a prompt's pairs into one row.
"""

import math
from dataclasses import dataclass

from plad_ray import pairs
from plad_ray.cluster import TOKENIZER_CPUS
from plad_ray.config import TrainConfig
from plad_ray.train.batching import PairTokenizer, group_samples


@dataclass(frozen=True)
class PairText:
    """How a pair's text becomes the student's token ids: the student's tokenizer (its folder), its chat template,
    and the stop strings that ended the teacher's and the student's outputs (text written without its ids)."""

    model_path: str
    chat_template: bool = False
    trust_remote_code: bool = False
    stops: tuple[str | None, str | None] = (None, None)


def trains_identical_pairs(train: TrainConfig) -> bool:
    """Whether pairs with two identical sides still teach (an NLL or per-token term; plad_ray.objectives), in any
    phase of the run (train.loss.seqkd_first trains seqkd first)."""
    return train.loss.seqkd_first > 0 or train.loss.objective.trains_identical_pairs(train.loss.nll_weight)


def prepare_pairs(pairs_ds, text: PairText, train: TrainConfig):
    """(train, heldout) datasets of token ids, and counts of every pair by what happened to it.

    One Ray Data pass: tokenize with the student's tokenizer (up to one actor per trainer
    worker), order (a shuffle seeded by train.seed and fixed by each pair's key), materialise;
    the counts are an aggregation and the splits filters over the materialised result.
    """
    tokenized = (
        tokenize(pairs_ds, text, train)
        # The training order: a shuffle seeded by train.seed and fixed by each pair's key, not by the
        # order the pairs were read in (pairs.with_training_order).
        .map_batches(pairs.with_training_order, fn_kwargs={"seed": train.seed}, batch_format="numpy")
        .sort("order")
        .materialize()
    )
    # Counts by (status, heldout[, verdict]): a Ray Data aggregation, a handful of rows to the driver
    # (one partition: there are at most a dozen groups).
    keys = ["status", "heldout"] + (["verdict"] if train.scorer else [])
    groups = tokenized.groupby(keys, num_partitions=1).count().take_all()
    count = lambda **match: sum(g["count()"] for g in groups if all(g[k] in v for k, v in match.items()))  # noqa: E731
    counts = {"pairs": count()}
    for status in ("identical", "too_long", "student_better"):
        counts[f"dropped_{status}"] = count(status=[status])
    if train.scorer:
        counts.update(
            {f"{who}_wins" if who != "tie" else "ties": count(verdict=[who]) for who in ("teacher", "tie", "student")}
        )
        counts["flipped_student_better"] = counts["student_wins"] if train.student_wins == "flip" else 0
    trained = trained_statuses(train)
    if trains_identical_pairs(train):
        counts["dropped_identical"] = 0  # they train the NLL or per-token part
    counts["train"] = count(status=trained, heldout=[False])
    # Held-out: every pair that fits; ranking figures leave out the identical ones (their NLL counts).
    counts["heldout"] = count(status=["ok", "identical"], heldout=[True])
    counts["heldout_ranked"] = count(status=["ok"], heldout=[True])
    from ray.data.expressions import col

    train_ds = tokenized.filter(expr=col("status").is_in(list(trained)) & (col("heldout") == False))  # noqa: E712
    heldout_ds = tokenized.filter(expr=col("status").is_in(["ok", "identical"]) & (col("heldout") == True))  # noqa: E712
    if train.loss.objective.groups_samples:
        # groupby sorts by id: put the prompts back in a seeded order fixed by their ids
        train_ds = (
            train_ds.groupby("id")
            .map_groups(group_samples, batch_format="numpy")
            .map_batches(pairs.with_training_order, fn_kwargs={"seed": train.seed}, batch_format="numpy")
            .sort("order")
            .materialize()
        )
        counts["train_prompts"] = train_ds.count()
    return train_ds, heldout_ds, counts


def tokenize(pairs_ds, text: PairText, train: TrainConfig, batch_size: int = 256):
    """Pair rows -> token ids and `status` (batching.PairTokenizer), by Ray Data actors, in blocks of
    `batch_size` rows."""
    return pairs_ds.map_batches(
        PairTokenizer,
        fn_constructor_kwargs=dict(
            model_path=text.model_path,
            max_length=train.max_length,
            chat_template=text.chat_template,
            trust_remote_code=text.trust_remote_code,
            scorer=train.scorer,
            student_wins=train.student_wins,
            chosen_stop=text.stops[0],
            rejected_stop=text.stops[1],
        ),
        batch_size=batch_size,
        # autoscaled by Ray Data from one tokenizer to one per trainer worker
        concurrency=(1, max(1, train.num_workers)),
        num_cpus=TOKENIZER_CPUS,
    )


def trained_statuses(train: TrainConfig) -> tuple[str, ...]:
    """The pair statuses the objective trains on: identical pairs only when it has an NLL or per-token part."""
    return ("ok", "identical") if trains_identical_pairs(train) else ("ok",)


def teacher_wins_line(counts: dict, policy: str) -> str:
    """How often PLaD's teacher-wins assumption held, by the scorer's verdicts."""
    n = max(counts["pairs"], 1)
    return (
        f"teacher-wins assumption held on {counts['teacher_wins']}/{counts['pairs']} pairs "
        f"({counts['teacher_wins'] / n:.1%}); ties {counts['ties']}, student won {counts['student_wins']} "
        f"(student_wins={policy})"
    )


def steps_per_epoch(train_rows: int, train: TrainConfig) -> int:
    """Optimizer steps per epoch; every worker gets train_rows // num_workers rows (pairs; prompts for listwise)."""
    rows_per_worker = train_rows // train.num_workers
    micro_batches = math.ceil(rows_per_worker / train.micro_batch_size)
    return micro_batches // train.gradient_accumulation_steps


def heldout_shards(heldout_ds, rows: int, num_workers: int) -> list:
    """The held-out pairs cut into one contiguous shard per rank (sizes within one of each other)."""
    if num_workers == 1:
        return [heldout_ds]  # Ray Data's split_at_indices refuses an empty list of cuts
    return heldout_ds.split_at_indices([rows * rank // num_workers for rank in range(1, num_workers)])
