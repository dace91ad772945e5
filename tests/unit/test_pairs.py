"""Pure tests of pair building (plad_ray.pairs)."""

from plad_ray import pairs
from plad_ray.generate.schemas import PAIR_SCHEMA


def test_finish_reason():
    # Ends on EOS -> eos (also at the limit); cut at max_tokens without EOS -> length; fewer
    # tokens and no EOS -> a stop string ended it -> stop.
    assert pairs.finish_reason(16, 16, last_token_id=7, eos_token_ids=[2]) == "length"
    assert pairs.finish_reason(16, 16, last_token_id=2, eos_token_ids=[2]) == "eos"
    assert pairs.finish_reason(5, 16, last_token_id=2, eos_token_ids=[2, 9]) == "eos"
    assert pairs.finish_reason(5, 16, last_token_id=7, eos_token_ids=[2]) == "stop"
    assert pairs.finish_reason(0, 16, last_token_id=None, eos_token_ids=[2]) == "stop"


def test_heldout_split_is_deterministic_and_near_the_fraction():
    ids = [f"p{i:05d}" for i in range(4000)]
    first = [pairs.is_heldout(i, 0.1) for i in ids]
    assert first == [pairs.is_heldout(i, 0.1) for i in ids]
    assert 0.08 < sum(first) / len(ids) < 0.12  # binomial(4000, 0.1): sd 0.0047, so +-4 sd
    assert not any(pairs.is_heldout(i, 0.0) for i in ids)


def test_expand_and_make_pair():
    teacher_row = {
        "id": "a",
        "prompt": "abc>",
        "teacher_text": "cba",
        "teacher_num_tokens": 4,
        "teacher_finish_reason": "eos",
        "teacher_token_ids": [5, 6, 7, 2],
        "teacher_model": "T",
        "teacher_sampling": "{}",
    }
    rows = pairs.expand_samples(teacher_row, 3)
    assert [r["sample_index"] for r in rows] == [0, 1, 2]
    student = {"text": "xx", "num_tokens": 2, "finish_reason": "length", "token_ids": [9, 9]}
    pair = pairs.make_pair(rows[1], student, "S", '{"t": 1}', 0.0)
    assert pair == {
        "id": "a",
        "sample_index": 1,
        "prompt": "abc>",
        "chosen": "cba",
        "rejected": "xx",
        "chosen_num_tokens": 4,
        "rejected_num_tokens": 2,
        "chosen_finish_reason": "eos",
        "rejected_finish_reason": "length",
        "chosen_token_ids": None,
        "rejected_token_ids": [9, 9],
        "teacher_model": "T",
        "student_model": "S",
        "teacher_sampling": "{}",
        "student_sampling": '{"t": 1}',
        "heldout": False,
    }
    assert set(pair) == set(PAIR_SCHEMA.names)
    # One vocabulary: the teacher's generated ids are the chosen side's ids.
    assert pairs.make_pair(rows[1], student, "S", "{}", 0.0, shared_vocabulary=True)["chosen_token_ids"] == [5, 6, 7, 2]
    # TRL's preference convention: prompt/chosen/rejected as plain strings.
    for column in ("prompt", "chosen", "rejected"):
        assert str(PAIR_SCHEMA.field(column).type) == "string"


def test_external_trl_pairs_get_ids_finish_reasons_and_split():
    batch = {"prompt": ["p1", "p2"], "chosen": ["a", "b"], "rejected": ["c", "d"]}
    out = pairs.with_training_columns(batch, heldout_fraction=0.5)
    assert out["chosen_finish_reason"] == out["rejected_finish_reason"] == ["eos", "eos"]
    assert len(set(out["id"])) == 2 and out == pairs.with_training_columns(batch, 0.5)  # stable ids
    assert out["heldout"] == [pairs.is_heldout(i, 0.5) for i in out["id"]]
    kept = pairs.with_training_columns({**batch, "id": [7, 8], "heldout": [True, False]}, 0.5)
    assert kept["id"] == ["7", "8"] and kept["heldout"] == [True, False]


def test_id_less_external_pairs_of_one_prompt_fall_on_one_side_of_the_split():
    # Three pairs for each of 200 prompts, in two batches that cut through one prompt's pairs (Ray Data
    # blocks): a hash of each pair's text split about half of such prompts across train and held out.
    prompts = [f"prompt {i}" for i in range(200)]
    rows = [(p, f"good {k}", f"bad {k}") for p in prompts for k in range(3)]
    out = {"id": [], "heldout": []}
    for part in (rows[:301], rows[301:]):
        batch = {"prompt": [r[0] for r in part], "chosen": [r[1] for r in part], "rejected": [r[2] for r in part]}
        done = pairs.with_training_columns(batch, heldout_fraction=0.3)
        out["id"] += done["id"]
        out["heldout"] += done["heldout"]
    sides, ids = {}, {}
    for (prompt, _, _), pid, held in zip(rows, out["id"], out["heldout"]):
        sides.setdefault(prompt, set()).add(held)
        ids.setdefault(prompt, set()).add(pid)
    assert all(len(s) == 1 for s in sides.values()) and all(len(i) == 1 for i in ids.values())
    assert len({next(iter(i)) for i in ids.values()}) == 200  # one id per prompt, distinct prompts apart
    held = sum(next(iter(s)) for s in sides.values())
    assert 30 < held < 90  # ~0.3 of the 200 prompts held out


def test_external_pairs_keep_plad_token_ids_and_their_nulls():
    import pandas as pd

    batch = {
        "prompt": ["p1", "p2"],
        "chosen": ["a", "b"],
        "rejected": ["c", "d"],
        "chosen_token_ids": pd.Series([[5, 2], pd.NA], dtype=object),
        "rejected_token_ids": [None, [7]],
    }
    out = pairs.with_training_columns(batch, heldout_fraction=0.0)
    assert out["chosen_token_ids"] == [[5, 2], None] and out["rejected_token_ids"] == [None, [7]]


def test_training_order_depends_on_the_keys_and_the_seed_only():
    # Sorting by `order` must give one permutation of the pairs whatever order they were read in.
    batch = {"id": ["p1", "p1", "p2", "p3"], "sample_index": [0, 1, 0, 0], "prompt": ["a", "a", "b", "c"]}
    out = pairs.with_training_order(batch, seed=0)
    assert out["prompt"] == batch["prompt"] and out["order"].dtype.name == "int64" and (out["order"] >= 0).all()
    assert len(set(out["order"].tolist())) == 4  # the two samples of p1 get different places
    backwards = pairs.with_training_order({k: v[::-1] for k, v in batch.items()}, seed=0)
    assert backwards["order"].tolist() == out["order"].tolist()[::-1]  # a pair's place follows it
    assert pairs.with_training_order(batch, seed=1)["order"].tolist() != out["order"].tolist()
    # Without sample_index (listwise rows, external pairs) a row's key is its id.
    grouped = pairs.with_training_order({"id": ["p2"]}, seed=0)
    assert grouped["order"].tolist() == [out["order"][2]]
