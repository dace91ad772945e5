"""Evaluation metrics against values worked out by hand."""

import math

import pytest

from plad_ray.evaluation.metrics import (confidence, exact_match, expected_calibration_error, reliability_bins,
                                         rouge_l, win_rate)


def test_exact_match_ignores_case_and_spacing_only():
    assert exact_match("  Paris ", "paris") == 1.0
    assert exact_match("olleh", "olleh") == 1.0
    assert exact_match("olle", "olleh") == 0.0


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat on a mat") = "the cat on mat" = 4 tokens
    p, r = 4 / 6, 4 / 5
    assert rouge_l("the cat sat on the mat", "the cat on a mat") == pytest.approx(2 * p * r / (p + r))
    assert rouge_l("a b c", "a b c") == 1.0
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("", "") == 1.0
    assert rouge_l("", "a") == 0.0


def test_win_rate_counts_ties_half():
    out = win_rate([1, 0, 1, 0], [0, 0, 1, 1])
    assert out == {"wins": 1, "ties": 2, "losses": 1, "win_rate": 0.5}


def test_confidence_is_exp_of_mean_token_logprob():
    assert confidence(0.0) == 1.0
    assert confidence(math.log(0.25)) == pytest.approx(0.25)


def test_ece_by_hand():
    # Two bins used: [0.2, 0.3) holds 0.25, 0.25 (1 of 2 right), [0.9, 1.0] holds 0.95, 1.0 (both right).
    conf, right = [0.25, 0.25, 0.95, 1.0], [1, 0, 1, 1]
    bins = reliability_bins(conf, right, num_bins=10)
    assert [b["count"] for b in bins] == [0, 0, 2, 0, 0, 0, 0, 0, 0, 2]
    assert bins[2]["accuracy"] == 0.5 and bins[9]["confidence"] == pytest.approx(0.975)
    expected = 0.5 * abs(0.5 - 0.25) + 0.5 * abs(1.0 - 0.975)
    assert expected_calibration_error(conf, right, 10) == pytest.approx(expected)


def test_ece_is_zero_when_confidence_matches_accuracy_and_large_when_overconfident():
    assert expected_calibration_error([0.5] * 4, [1, 0, 1, 0], 10) == pytest.approx(0.0)
    assert expected_calibration_error([0.99] * 4, [0, 0, 0, 0], 10) == pytest.approx(0.99)


def test_score_outputs_with_a_verifier_and_references():
    from plad_ray.evaluation.stage import score_outputs

    rows = [{"prompt": "abc>", "teacher_text": "cba", "reference": "cba"},
            {"prompt": "xyz>", "teacher_text": "zyx", "reference": "zyx"},
            {"prompt": "hello>", "teacher_text": "olle", "reference": "olleh"}]
    outputs = [{"text": "cba", "num_tokens": 4, "mean_logprob": math.log(0.9)},
               {"text": "xyz", "num_tokens": 4, "mean_logprob": math.log(0.8)},
               {"text": "olleh", "num_tokens": 6, "mean_logprob": math.log(0.3)}]
    m = score_outputs(rows, outputs, "reverse", num_bins=10)
    assert m["verifier_accuracy"] == pytest.approx(2 / 3) and m["exact_match"] == pytest.approx(2 / 3)
    # Student vs teacher by the verifier: tie (both right), loss (teacher right), win (teacher wrong).
    assert m["vs_teacher"] == {"wins": 1, "ties": 1, "losses": 1, "win_rate": 0.5}
    # Bins: 0.3 right, 0.8 wrong, 0.9 right -> ECE = (|1-0.3| + |0-0.8| + |1-0.9|) / 3
    assert m["ece"] == pytest.approx((0.7 + 0.8 + 0.1) / 3)
    assert m["mean_confidence"] == pytest.approx((0.9 + 0.8 + 0.3) / 3)
    teacher = score_outputs(rows, None, "reverse", num_bins=10)
    assert teacher["verifier_accuracy"] == pytest.approx(2 / 3) and "ece" not in teacher and "vs_teacher" not in teacher


def test_token_logprobs_reads_the_generated_tokens_entry():
    from plad_ray.evaluation.stage import token_logprobs

    rows = [{"5": {"logprob": -0.5, "rank": 1}}, {7: {"logprob": -1.5, "rank": 2}, 3: {"logprob": -0.1, "rank": 1}}]
    assert token_logprobs(rows, [5, 7]) == [-0.5, -1.5]
