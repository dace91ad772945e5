"""The teacher scoring stage's pure parts (plad_ray.teacher_logprobs) and its resume key join; the stage
itself runs end to end, checked against the teacher's own forward pass, in
tests/integration/test_pipeline_e2e.py::test_a_second_round_samples_the_trained_student_and_reuses_teacher_outputs."""

import math

import pytest

from plad_ray import teacher_logprobs as tl
from plad_ray.generate.schemas import SCORE_SCHEMA


def entry(*ranked):
    """One position of vLLM's prompt log-probs: (token id, log-prob, rank) triples."""
    return {t: {"logprob": lp, "rank": r, "decoded_token": None} for t, lp, r in ranked}


def test_the_response_positions_give_each_token_its_log_prob_and_the_top_k_in_rank_order():
    # prompt [7, 8], response [5, 9]; k = 2. Position 2 (token 5) is the most likely token there; position 3's
    # token 9 is outside the top 2, so vLLM lists it as a third entry with its own rank.
    prompt_logprobs = [
        None,
        entry((8, -0.1, 1), (3, -2.5, 2)),
        entry((5, -0.2, 1), (6, -1.9, 2)),
        entry((9, -4.0, 7), (4, -0.5, 1), (2, -1.2, 2)),
    ]
    got = tl.read_prompt_logprobs(prompt_logprobs, [7, 8, 5, 9], prompt_len=2, k=2)
    assert got == {
        "num_tokens": 2,
        "prompt_tokens": 2,
        "token_ids": [5, 9],
        "logprobs": [-0.2, -4.0],
        "topk_ids": [5, 6, 4, 2],
        "topk_logprobs": [-0.2, -1.9, -0.5, -1.2],
    }
    # The prompt's own positions are not scored; an empty response gives empty columns.
    empty = tl.read_prompt_logprobs(prompt_logprobs[:2], [7, 8], prompt_len=2, k=2)
    assert empty["num_tokens"] == 0 and empty["topk_ids"] == [] and empty["logprobs"] == []


def test_token_ids_as_strings_from_a_round_trip_are_read_as_ints():
    got = tl.read_prompt_logprobs([None, {"4": {"logprob": -0.7, "rank": 1}}], [1, 4], prompt_len=1, k=1)
    assert got["logprobs"] == [-0.7] and got["topk_ids"] == [4]


def test_a_position_with_fewer_than_k_alternatives_is_an_error_not_a_short_row():
    with pytest.raises(ValueError, match="position 1: vLLM returned 1 of the top 2 log-probs"):
        tl.read_prompt_logprobs([None, entry((4, -0.1, 1))], [3, 4], prompt_len=1, k=2)


def test_sample_zero_also_scores_the_prompts_teacher_output_once():
    pair = {
        "id": "p1",
        "sample_index": 0,
        "prompt": "ab>",
        "chosen": "ba",
        "rejected": "aa",
        "chosen_finish_reason": "eos",
        "rejected_finish_reason": "length",
        "chosen_token_ids": [5, 4, 2],
        "rejected_token_ids": [4, 4],
    }
    first = tl.scoring_sequences(pair)
    assert [(s["side"], s["text"], s["generated_ids"], s["finish_reason"]) for s in first] == [
        ("chosen", "ba", [5, 4, 2], "eos"),
        ("rejected", "aa", [4, 4], "length"),
    ]
    assert all(s["id"] == "p1" and s["sample_index"] == 0 and s["prompt"] == "ab>" for s in first)
    later = tl.scoring_sequences({**pair, "sample_index": 1})
    assert [(s["side"], s["sample_index"]) for s in later] == [("rejected", 1)]


def test_a_request_leaves_room_for_the_one_token_vllm_samples():
    assert tl.fit([1, 2, 3], [4, 5, 6, 7], max_model_len=6) == ([1, 2, 3], [4, 5])
    assert tl.fit([1, 2, 3], [4], max_model_len=64) == ([1, 2, 3], [4])
    assert tl.fit([1] * 10, [4, 5], max_model_len=8) == ([1] * 10, [])


def test_bytes_per_scored_token():
    assert tl.bytes_per_token(3690, 100) == 36.9
    assert tl.bytes_per_token(0, 0) == 0.0


def test_scoring_config_is_checked_with_one_line_each():
    from plad_ray.config import Config, EndpointConfig, TeacherEngineConfig

    def problems(**teacher):
        return [(key, text) for key, ok, text in TeacherEngineConfig(model="t", **teacher).checks("teacher.") if not ok]

    assert problems(score_samples=True) == []
    assert problems(score_top_k=0) == [("teacher.score_top_k", "must be >= 1")]
    assert problems(score_top_k=21)[0][1].startswith("must be <= 20, the most log-probs vLLM returns per token")
    assert problems(score_top_k=64, engine_kwargs={"max_logprobs": 64}) == []
    assert problems(score_top_k=64, engine_kwargs={"max_logprobs": -1}) == []  # vLLM: no cap
    endpoint = EndpointConfig(url="http://x/v1/completions")
    # An endpoint scores with its server's prompt log-probs; how many it returns is the server's to say (the
    # probe before the run asks it: tests/unit/generate/test_endpoint_scoring.py), not engine_kwargs'.
    assert problems(score_samples=True, endpoint=endpoint) == []
    assert problems(score_samples=True, score_top_k=50, endpoint=endpoint) == []
    assert [k for k, _ in problems(score_samples=True, score_top_k=0, endpoint=endpoint)] == ["teacher.score_top_k"]
    assert Config().teacher.score_samples is False and Config().teacher.score_top_k == 20


def test_turning_scoring_on_keeps_the_teacher_outputs_pairs_and_training():
    from plad_ray.config import Config
    from plad_ray.outputs import stage_keys

    off, on = Config(), Config()
    on.teacher.score_samples, on.teacher.score_top_k = True, 5
    a, b = stage_keys(off), stage_keys(on)
    assert a["teacher"] == b["teacher"] and a["pairs"] == b["pairs"] and a["train"] == b["train"]
    assert a["scores"] != b["scores"]


def test_only_sequences_not_yet_scored_are_sent_again(local_ray):
    """The resume join: (id, sample_index, side) keys on disk (sample_index int32 there, int64 in the
    expanded rows) are taken out, and nothing else."""
    import pyarrow as pa
    import ray.data

    from plad_ray.generate.scores import _to_score

    pairs = [
        {
            "id": f"p{i}",
            "sample_index": k,
            "prompt": "x>",
            "chosen": "c",
            "rejected": "r",
            "chosen_finish_reason": "eos",
            "rejected_finish_reason": "eos",
            "chosen_token_ids": [1],
            "rejected_token_ids": [2],
        }
        for i in range(3)
        for k in range(2)
    ]
    done = pa.table(
        {
            "id": ["p0", "p0", "p1"],
            "sample_index": pa.array([0, 1, 0], pa.int32()),
            "side": ["chosen", "rejected", "rejected"],
        }
    )
    left = _to_score(ray.data.from_items(pairs), ray.data.from_arrow(done), num_partitions=2).take_all()
    keys = sorted((r["id"], int(r["sample_index"]), r["side"]) for r in left)
    everything = {(f"p{i}", k, "rejected") for i in range(3) for k in range(2)} | {
        (f"p{i}", 0, "chosen") for i in range(3)
    }
    assert len(everything) == 9
    assert keys == sorted(everything - {("p0", 0, "chosen"), ("p0", 1, "rejected"), ("p1", 0, "rejected")})
    assert math.isclose(len(keys) / len(everything), 6 / 9)


def test_the_teacher_scorer_judges_by_the_scores_the_rows_carry():
    from plad_ray.verifiers import TEACHER, judge_pairs

    rows = [
        {"prompt": "ab>", "chosen": "ba", "rejected": "aa", "chosen_score": -0.2, "rejected_score": -1.5},
        {"prompt": "cd>", "chosen": "dc", "rejected": "xx", "chosen_score": -2.0, "rejected_score": -0.5},
        {"prompt": "ef>", "chosen": "fe", "rejected": "fe", "chosen_score": -0.3, "rejected_score": -0.3},
    ]
    judged, verdicts, dropped = judge_pairs(rows, TEACHER, "flip")
    assert verdicts == ["teacher", "student", "tie"] and dropped == [False, False, False]
    # the pair the teacher liked less than the student's sample is flipped, scores and all
    assert judged[1]["chosen"] == "xx" and judged[1]["chosen_score"] == -0.5 and judged[1]["rejected_score"] == -2.0
    assert judged[0] == rows[0]


def _score(i, k, side, logprobs) -> dict:
    return {
        "id": f"p{i}",
        "sample_index": k,
        "side": side,
        "num_tokens": len(logprobs),
        "prompt_tokens": 3,
        "token_ids": [1] * len(logprobs),
        "logprobs": logprobs,
        "topk_ids": [],
        "topk_logprobs": [],
    }


def _write_scores(uri: str) -> None:
    """Committed teacher scores of pairs (p0, 0), (p0, 1), (p1, 0): mean log-probs -0.2 / -2.0, -0.2 / -4.0,
    -0.5 / -0.5 (chosen / rejected)."""
    import pyarrow as pa
    import ray.data

    from plad_ray.data import parquet

    rows = [
        _score(0, 0, "chosen", [-0.1, -0.3]),
        _score(0, 0, "rejected", [-1.0, -2.0, -3.0]),
        _score(0, 1, "rejected", [-4.0]),
        _score(1, 0, "chosen", [-0.5]),
        _score(1, 0, "rejected", [-0.25, -0.75]),
    ]
    parquet.write_pending(ray.data.from_arrow(pa.Table.from_pylist(rows, SCORE_SCHEMA)), uri, SCORE_SCHEMA)
    parquet.commit(uri, {}, tl.KEYS, log=lambda _: None)


def test_pairs_get_the_teacher_mean_log_prob_of_each_side(local_ray, tmp_path):
    import pyarrow as pa
    import ray.data

    from plad_ray.errors import DataError
    from plad_ray.train.score_joins import with_teacher_scores

    uri = str(tmp_path / "teacher_scores")
    _write_scores(uri)
    pairs = pa.table(
        {
            "id": ["p0", "p0", "p1"],
            "sample_index": pa.array([0, 1, 0], pa.int32()),
            "chosen": ["c0", "c0", "c1"],
            "rejected": ["r00", "r01", "r10"],
        }
    )
    got = sorted(with_teacher_scores(ray.data.from_arrow(pairs), uri, 3).take_all(), key=lambda r: r["rejected"])
    assert [(r["rejected"], r["chosen_score"], r["rejected_score"]) for r in got] == [
        ("r00", pytest.approx(-0.2), pytest.approx(-2.0)),
        ("r01", pytest.approx(-0.2), pytest.approx(-4.0)),
        ("r10", pytest.approx(-0.5), pytest.approx(-0.5)),
    ]
    # A pair without its scores stops the run; it is not trained without them.
    more = pa.concat_tables(
        [
            pairs,
            pa.table({"id": ["p2"], "sample_index": pa.array([0], pa.int32()), "chosen": ["c2"], "rejected": ["r20"]}),
        ]
    )
    with pytest.raises(DataError, match="1 of 4 pairs have no teacher scores"):
        with_teacher_scores(ray.data.from_arrow(more), uri, 4)
    with pytest.raises(DataError, match="the top-k objectives need teacher.score_samples=true"):
        with_teacher_scores(ray.data.from_arrow(pairs), str(tmp_path / "none"), 3)


def test_a_run_judged_by_the_teacher_trains_on_given_pairs_with_their_scores_joined(local_ray, tmp_path):
    """The driver's reading of train.pairs with train.scorer=teacher and train.teacher_scores (margin on the teacher's
    scores trains end to end in make test-slow, test_pipeline_e2e.py): each pair arrives with both sides' mean log-prob,
    which the tokenizer stage judges by."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from plad_ray.config import Config
    from plad_ray.train.driver import _pairs_on_disk

    scores, given = tmp_path / "teacher_scores", tmp_path / "given"
    _write_scores(str(scores))
    given.mkdir()
    pq.write_table(
        pa.table(
            {
                "id": ["p0", "p0", "p1"],
                "sample_index": pa.array([0, 1, 0], pa.int32()),
                "prompt": ["a>", "a>", "b>"],
                "chosen": ["c0", "c0", "c1"],
                "rejected": ["r00", "r01", "r10"],
            }
        ),
        given / "part-0.parquet",
    )
    cfg = Config(output_dir=str(tmp_path / "run"))
    cfg.train.pairs, cfg.train.teacher_scores, cfg.train.scorer = str(given), str(scores), "teacher"
    cfg.train.loss.type = "margin"
    on_disk = _pairs_on_disk(cfg.train, cfg.context(), 1, "unused: margin reads no top-k", False)
    got = sorted(on_disk.take_all(), key=lambda r: r["rejected"])
    assert [(r["rejected"], r["chosen_score"], r["rejected_score"]) for r in got] == [
        ("r00", pytest.approx(-0.2), pytest.approx(-2.0)),
        ("r01", pytest.approx(-0.2), pytest.approx(-4.0)),
        ("r10", pytest.approx(-0.5), pytest.approx(-0.5)),
    ]
    cfg.train.scorer = "reverse"  # judged by a verifier: no scores read
    assert "chosen_score" not in _pairs_on_disk(cfg.train, cfg.context(), 1, "unused", False).take(1)[0]


def test_top_k_ids_past_the_students_rows_stop_the_run_before_training(local_ray, tmp_path):
    import pyarrow as pa
    import ray.data

    from plad_ray.data import parquet
    from plad_ray.errors import DataError
    from plad_ray.train.score_joins import with_teacher_topk

    def score(i, side, topk_ids):  # one scored token, k = 2
        return {
            "id": f"p{i}",
            "sample_index": 0,
            "side": side,
            "num_tokens": 1,
            "prompt_tokens": 3,
            "token_ids": [1],
            "logprobs": [-0.1],
            "topk_ids": topk_ids,
            "topk_logprobs": [-0.1, -2.5],
        }

    # p1's teacher output (chosen) has the largest id, 151,935; the samples' (rejected) largest is 151,000
    rows = [
        score(0, "chosen", [5, 9]),
        score(0, "rejected", [151000, 3]),
        score(1, "chosen", [151935, 7]),
        score(1, "rejected", [4, 8]),
    ]
    uri = str(tmp_path / "teacher_scores")
    parquet.write_pending(ray.data.from_arrow(pa.Table.from_pylist(rows, SCORE_SCHEMA)), uri, SCORE_SCHEMA)
    parquet.commit(uri, {}, tl.KEYS, log=lambda _: None)
    pairs = pa.table(
        {
            "id": ["p0", "p1"],
            "sample_index": pa.array([0, 0], pa.int32()),
            "chosen": ["c0", "c1"],
            "rejected": ["r0", "r1"],
        }
    )
    both = ("chosen", "rejected")
    assert with_teacher_topk(ray.data.from_arrow(pairs), uri, 2, both, 151936).count() == 2  # Qwen2.5-0.5B's rows
    # onpolicy_kd reads only the samples' top-k: ids up to 151,000 fit 151,001 rows
    assert with_teacher_topk(ray.data.from_arrow(pairs), uri, 2, ("rejected",), 151001).count() == 2
    with pytest.raises(DataError) as err:
        with_teacher_topk(ray.data.from_arrow(pairs), uri, 2, both, 151935, "config key train.teacher_scores:")
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        f"config key train.teacher_scores: {uri}: top-k id 151935 is past the student's 151935 embedding rows "
        "(ids 0 to 151934)"
    )
    with pytest.raises(DataError, match=f"teacher scores {uri}: top-k id 151000 is past the student's 151000"):
        with_teacher_topk(ray.data.from_arrow(pairs), uri, 2, ("rejected",), 151000)


def test_the_teacher_scorer_needs_the_scoring_stage_and_is_no_verifier():
    from plad_ray.config import Config
    from plad_ray.evaluation.stage import verifier

    cfg = Config()
    cfg.train.scorer, cfg.train.loss.type = "teacher", "margin"

    def refused(cfg):
        return [(k, t) for k, ok, t in cfg._checks() if not ok and k.startswith("train.")]

    assert refused(cfg) == [
        (
            "train.scorer",
            "the teacher scorer reads the teacher's log-probs of the pairs: set teacher.score_samples=true "
            "(this run's pairs) or train.teacher_scores (beside train.pairs)",
        )
    ]
    cfg.teacher.score_samples = True
    assert refused(cfg) == []
    # Given pairs: this run's scoring does not score them; their own run's teacher_scores/ does.
    cfg.train.pairs = "other/pairs"
    assert [k for k, _ in refused(cfg)] == ["train.scorer"]
    cfg.train.teacher_scores = "other/teacher_scores"
    assert refused(cfg) == []
    cfg.train.pairs = None  # scores without the pairs they score
    assert refused(cfg) == [
        (
            "train.teacher_scores",
            "scores of given pairs: set train.pairs too (a run's own pairs use its teacher.score_samples)",
        )
    ]
    assert verifier(cfg) is None  # new generations have no teacher scores: evaluation judges by text only
    cfg.eval.scorer = "reverse"
    assert verifier(cfg) == "reverse"


def test_scoring_off_keeps_the_scores_and_another_k_makes_them_stale(tmp_path):
    from plad_ray.config import Config
    from plad_ray.errors import ConfigError
    from plad_ray.outputs import prepare_output

    def config(score: bool, k: int = 20) -> Config:
        cfg = Config(output_dir=str(tmp_path / "run"))
        cfg.teacher.score_samples, cfg.teacher.score_top_k = score, k
        return cfg

    prepare_output(config(True))
    (tmp_path / "run" / "teacher_scores").mkdir()
    prepare_output(config(False))  # a run without scoring neither refuses nor removes them
    assert (tmp_path / "run" / "teacher_scores").is_dir()
    prepare_output(config(True))  # ... and turning it back on finds them as they were made
    with pytest.raises(
        ConfigError,
        match=r"its scores outputs were made with a different config "
        r"\(teacher_scoring.score_top_k: 20 -> 5\)",
    ):
        prepare_output(config(True, 5))
    prepare_output(config(True, 5), overwrite=True, log=lambda _: None)
    assert not (tmp_path / "run" / "teacher_scores").exists()
