"""Evaluation metrics against values worked out by hand."""

import math

import pytest

from plad_ray.evaluation.metrics import (
    confidence,
    correctness_of,
    exact_match,
    expected_calibration_error,
    reliability_bins,
    rouge_l,
    win_rate,
)


def test_exact_match_ignores_case_and_spacing_only():
    assert exact_match("  Paris ", "paris") == 1.0
    assert exact_match("olleh", "olleh") == 1.0
    assert exact_match("olle", "olleh") == 0.0


def test_one_output_is_judged_by_the_verifier_when_there_is_one_else_by_the_reference():
    row = {"prompt": "reverse: abc", "reference": "cba"}
    graded = lambda prompt, text: {"cba": 1.0, "cb": 0.5}.get(text, 0.0)  # noqa: E731 - a verifier's score
    assert [correctness_of(row, t, graded) for t in ("cba", "cb", "x")] == [1.0, 0.0, 0.0]  # only a full score
    assert [correctness_of(row, t) for t in (" CBA ", "cb")] == [1.0, 0.0]
    assert correctness_of({**row, "reference": None}, "cba") is None  # neither: no judgement, not a 0


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat on a mat") = "the cat on mat" = 4 tokens
    p, r = 4 / 6, 4 / 5
    assert rouge_l("the cat sat on the mat", "the cat on a mat") == pytest.approx(2 * p * r / (p + r))
    assert rouge_l("a b c", "a b c") == 1.0
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("", "") == 1.0
    assert rouge_l("", "a") == 0.0


def test_rouge_l_scores_words_not_punctuation_in_any_script():
    # Whitespace-split ROUGE (before rouge-score) gave "Rome." vs "Rome" 0.0.
    assert rouge_l("Rome.", "Rome") == 1.0 and rouge_l("It is Rome!", "it is rome") == 1.0
    # rouge-score's own tokenizer drops non-[a-z0-9]: these would all have scored 0 (or 1 for both empty).
    assert rouge_l("Köln liegt am Rhein", "Köln am Rhein") == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert rouge_l("東京 です", "東京 です") == 1.0 and rouge_l("東京", "大阪") == 0.0
    assert rouge_l("...", "!!") == 1.0  # no words on either side


def test_ece_equals_torchmetrics_binary_calibration_error():
    """ECE stays hand-written because the reliability diagram needs its per-bin counts, which torchmetrics does
    not return; it must equal torchmetrics' L1 binary calibration error on the same equal-width bins."""
    import random

    import torch
    from torchmetrics.functional.classification import binary_calibration_error

    rng = random.Random(0)
    for n, bins in ((50, 10), (500, 15), (7, 5)):
        conf = [rng.random() for _ in range(n)]
        right = [float(rng.random() < c) for c in conf]
        theirs = binary_calibration_error(
            torch.tensor(conf, dtype=torch.float64), torch.tensor(right).long(), n_bins=bins, norm="l1"
        ).item()
        assert expected_calibration_error(conf, right, bins) == pytest.approx(theirs, abs=1e-6)


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

    rows = [
        {"prompt": "abc>", "teacher_text": "cba", "reference": "cba"},
        {"prompt": "xyz>", "teacher_text": "zyx", "reference": "zyx"},
        {"prompt": "hello>", "teacher_text": "olle", "reference": "olleh"},
    ]
    outputs = [
        {"text": "cba", "num_tokens": 4, "mean_logprob": math.log(0.9)},
        {"text": "xyz", "num_tokens": 4, "mean_logprob": math.log(0.8)},
        {"text": "olleh", "num_tokens": 6, "mean_logprob": math.log(0.3)},
    ]
    m = score_outputs(rows, outputs, "reverse", num_bins=10)
    assert m["verifier_accuracy"] == pytest.approx(2 / 3) and m["exact_match"] == pytest.approx(2 / 3)
    # Student vs teacher by the verifier: tie (both right), loss (teacher right), win (teacher wrong).
    assert m["vs_teacher"] == {"wins": 1, "ties": 1, "losses": 1, "win_rate": 0.5, "judged_by": "reverse"}
    # Bins: 0.3 right, 0.8 wrong, 0.9 right -> ECE = (|1-0.3| + |0-0.8| + |1-0.9|) / 3
    assert m["ece"] == pytest.approx((0.7 + 0.8 + 0.1) / 3)
    assert m["mean_confidence"] == pytest.approx((0.9 + 0.8 + 0.3) / 3)
    # AUROC: correct at 0.9 and 0.3, wrong at 0.8: (0.9 > 0.8) yes, (0.3 > 0.8) no -> 1/2.
    assert m["auroc"] == pytest.approx(0.5) and m["calibration_note"] is None
    teacher = score_outputs(rows, None, "reverse", num_bins=10)
    assert teacher["verifier_accuracy"] == pytest.approx(2 / 3) and "ece" not in teacher and "vs_teacher" not in teacher


def test_score_outputs_with_samples_and_a_graded_scorer():
    from plad_ray.evaluation.stage import score_outputs

    rows = [
        {"prompt": "ab>", "teacher_text": "ba", "reference": "ba"},
        {"prompt": "1+2=", "teacher_text": "3", "reference": "3"},
    ]
    # Greedy: both wrong (the calibration figures say so). Samples: prompt 1 has one right of two, and the
    # surer one (-0.1) is it; prompt 2 has none right. Sampled accuracy 1/4, best-of-2 accuracy 1/2.
    outputs = [
        {
            "text": "bb",
            "num_tokens": 3,
            "mean_logprob": -0.5,
            "samples": [{"text": "aa", "mean_logprob": -0.9}, {"text": "ba", "mean_logprob": -0.1}],
        },
        {
            "text": "4",
            "num_tokens": 2,
            "mean_logprob": -0.2,
            "samples": [{"text": "5", "mean_logprob": -0.3}, {"text": "7", "mean_logprob": -0.4}],
        },
    ]
    m = score_outputs(rows, outputs, "tiny_exact", num_bins=10, graded_name="tiny_similarity")
    assert m["verifier_accuracy"] == 0.0 and m["calibration_note"].startswith("uninformative: no output is correct")
    assert math.isnan(m["auroc"])
    assert m["sampled_accuracy"] == pytest.approx(0.25) and m["best_of_n_accuracy"] == pytest.approx(0.5)
    assert m["num_samples"] == 2
    # Graded: "bb" vs "ba" 1 - 1/2; "4" vs "3" 0 -> mean 0.25; win rates judged by it (teacher 1.0 twice).
    assert m["graded_score"] == pytest.approx(0.25)
    assert m["vs_teacher"]["losses"] == 2 and m["vs_teacher"]["judged_by"] == "tiny_similarity"


def test_token_logprobs_reads_the_generated_tokens_entry():
    from plad_ray.evaluation.stage import token_logprobs

    rows = [{"5": {"logprob": -0.5, "rank": 1}}, {7: {"logprob": -1.5, "rank": 2}, 3: {"logprob": -0.1, "rank": 1}}]
    assert token_logprobs(rows, [5, 7]) == [-0.5, -1.5]


def test_edit_similarity_by_hand():
    from plad_ray.verifiers import edit_similarity

    assert edit_similarity("olleh", "olleh") == 1.0
    assert edit_similarity("olle", "olleh") == pytest.approx(1 - 1 / 5)  # one insertion
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)  # the textbook distance 3
    assert edit_similarity("", "") == 1.0 and edit_similarity("", "ab") == 0.0


def test_auroc_by_hand_and_uninformative_cases():
    from plad_ray.evaluation.metrics import auroc, calibration_note

    # Correct at 0.9 and 0.4, wrong at 0.5 and 0.1: of the 4 (correct, wrong) pairs, 3 are ordered right.
    assert auroc([0.9, 0.4, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(3 / 4)
    assert auroc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)  # a tie counts half
    assert math.isnan(auroc([0.2, 0.3], [0, 0]))
    assert calibration_note([0, 0, 0]).startswith("uninformative: no output is correct")
    assert calibration_note([1, 1]).startswith("uninformative: every output is correct")
    assert calibration_note([1, 0]) is None


def test_best_of_n_picks_the_most_confident_sample():
    from plad_ray.evaluation.metrics import best_of_n

    # Prompt 1: the surest sample (-0.1) is right; prompt 2: the surest (-0.2) is wrong.
    assert best_of_n([[(-0.5, 0.0), (-0.1, 1.0)], [(-0.2, 0.0), (-0.9, 1.0)]]) == 0.5


def test_paired_bootstrap_interval():
    from plad_ray.evaluation.metrics import paired_bootstrap

    # a beats b by exactly 1 on every item: every resample's mean difference is 1.
    assert paired_bootstrap([2, 3, 4], [1, 2, 3], num_resamples=200) == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 3}
    ci = paired_bootstrap([1, 0] * 50, [0, 0] * 50, num_resamples=2000, seed=1)
    assert ci["mean"] == 0.5 and 0.38 < ci["low"] < 0.5 < ci["high"] < 0.62  # sd of the mean 0.05


def test_evaluation_summary_says_when_ece_is_uninformative():
    from plad_ray.evaluation.metrics import reliability_bins
    from plad_ray.evaluation.report import markdown, reliability_png

    bins = reliability_bins([0.2, 0.4], [0, 0], 10)
    models = {
        "teacher (cached outputs)": {"prompts": 2, "exact_match": 1.0},
        "initial student": {
            "prompts": 2,
            "exact_match": 0.0,
            "ece": 0.3,
            "auroc": float("nan"),
            "mean_confidence": 0.3,
            "reliability": bins,
            "calibration_note": "uninformative: no output is correct, so ...",
        },
    }
    text = markdown({"models": models, "scorer": None}, "r.png")
    assert text.index("## Task quality") < text.index("## Calibration")
    assert "| model | ECE | mean confidence |" in text and "| initial student | 0.300 | 0.300 |" in text  # AUROC: nan
    assert "- initial student: ECE and AUROC are uninformative: no output is correct" in text
    assert reliability_png(models)[:4] == b"\x89PNG"
