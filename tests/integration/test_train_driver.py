"""The training driver's pair preparation on a real local Ray: counts come from a Ray Data aggregation
(no per-pair Python on the driver) and must equal a row-by-row recount of what the tokenizer stage said."""

import random
from collections import Counter

import pyarrow as pa
import pytest

from plad_ray.config import LossConfig, TrainConfig
from plad_ray.generate.schemas import PAIR_SCHEMA

pytestmark = pytest.mark.integration


def reversal_pairs(n: int, seed: int = 0) -> pa.Table:
    """Reversal prompts ("abc>" -> "cba"): the teacher right on most, the student on some, a few
    identical, a few whose prompt alone is too long for max_length, a fifth held out."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(60, 70) if i % 11 == 0 else rng.randint(3, 8)))
        answer = word[::-1]
        chosen = answer if i % 5 else word  # teacher wrong on every fifth
        rejected = chosen if i % 7 == 0 else (answer if i % 3 == 0 else word + "x")
        rows.append(
            {
                "id": f"r{i:04d}",
                "sample_index": 0,
                "prompt": word + ">",
                "chosen": chosen,
                "rejected": rejected,
                "chosen_num_tokens": len(chosen),
                "rejected_num_tokens": len(rejected),
                "chosen_finish_reason": "eos",
                "rejected_finish_reason": "eos",
                "teacher_model": "t",
                "student_model": "s",
                "teacher_sampling": "{}",
                "student_sampling": "{}",
                "heldout": i % 5 == 2,
            }
        )
    return pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)


@pytest.mark.parametrize(
    "loss_type,nll_weight,scorer,policy",
    [
        ("hinge", 0.0, "reverse", "drop"),
        ("seqkd", 0.0, None, "keep"),
        ("listwise", 1.0, "reverse", "flip"),
    ],
)
def test_prepare_pairs_counts_equal_a_row_by_row_recount(local_ray, tiny_models, loss_type, nll_weight, scorer, policy):
    import ray.data

    from plad_ray.train.batching import PairTokenizer
    from plad_ray.train.prepare import PairText, prepare_pairs

    table = reversal_pairs(200)
    train = TrainConfig(
        max_length=48, scorer=scorer, student_wins=policy, loss=LossConfig(type=loss_type, nll_weight=nll_weight)
    )
    train_ds, heldout_ds, counts = prepare_pairs(ray.data.from_arrow(table), PairText(tiny_models["student"]), train)

    # The same stage run by hand over all rows, counted in Python as the driver used to.
    tokenized = PairTokenizer(tiny_models["student"], train.max_length, scorer=scorer, student_wins=policy)(
        {k: table.column(k).to_numpy(zero_copy_only=False) for k in table.column_names}
    )
    rows = list(zip(tokenized["status"], tokenized["heldout"], tokenized["verdict"], tokenized["id"]))
    statuses = Counter(s for s, _, _, _ in rows)
    assert statuses["too_long"] > 0 and statuses["identical"] > 0  # the recount covers every kind
    trained = ("ok", "identical") if loss_type == "seqkd" or nll_weight > 0 else ("ok",)
    expected = {
        "pairs": 200,
        "dropped_too_long": statuses["too_long"],
        "dropped_student_better": statuses["student_better"],
        "dropped_identical": 0 if trained == ("ok", "identical") else statuses["identical"],
        "train": sum(s in trained and not h for s, h, _, _ in rows),
        "heldout": sum(s in ("ok", "identical") and h for s, h, _, _ in rows),
        "heldout_ranked": sum(s == "ok" and h for s, h, _, _ in rows),
    }
    if scorer:
        verdicts = Counter(v for _, _, v, _ in rows)
        assert verdicts["student"] > 0 and verdicts["teacher"] > 0
        expected.update(
            teacher_wins=verdicts["teacher"],
            ties=verdicts["tie"],
            student_wins=verdicts["student"],
            flipped_student_better=verdicts["student"] if policy == "flip" else 0,
        )
        # drop: every pair the student won is dropped, unless its prompt was already too long
        assert (
            policy != "drop"
            or statuses["student_better"] == sum(v == "student" and s != "too_long" for s, _, v, _ in rows) > 0
        )
    if loss_type == "listwise":
        expected["train_prompts"] = len({i for s, h, _, i in rows if s in trained and not h})
    assert counts == expected
    assert heldout_ds.count() == counts["heldout"]
    assert train_ds.count() == counts.get("train_prompts", counts["train"])


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_heldout_shards_cover_every_pair_once_for_any_number_of_ranks(local_ray, workers):
    # One trainer worker used to fail here (Ray Data refuses split_at_indices([])): the quality benchmark's config.
    import ray

    from plad_ray.train.prepare import heldout_shards

    shards = heldout_shards(ray.data.range(10), 10, workers)
    ids = [[row["id"] for row in shard.take_all()] for shard in shards]
    assert len(ids) == workers and sorted(i for shard in ids for i in shard) == list(range(10))
    assert max(map(len, ids)) - min(map(len, ids)) <= 1
