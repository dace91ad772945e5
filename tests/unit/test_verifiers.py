"""Pure tests of plad_ray.verifiers."""

import pytest

from plad_ray.verifiers import apply_policy, get_scorer, reverse_verifier, verdict


def test_reverse_verifier():
    assert reverse_verifier("hello>", "olleh") == 1.0
    assert reverse_verifier("hello>", "olle") == 0.0
    assert reverse_verifier("hello>", "olleh ") == 0.0  # exact answers only
    assert get_scorer("reverse") is reverse_verifier
    with pytest.raises(ValueError, match="unknown scorer 'rouge'"):
        get_scorer("rouge")


def test_verdict():
    assert [verdict(1, 0), verdict(1, 1), verdict(0, 0), verdict(0, 1)] == ["teacher", "tie", "tie", "student"]


def test_policy_only_touches_pairs_the_student_won():
    pair = {
        "chosen": "t",
        "rejected": "s",
        "chosen_finish_reason": "length",
        "rejected_finish_reason": "eos",
        "chosen_score": 0.0,
        "rejected_score": 1.0,
        "chosen_ids": [1],
        "rejected_ids": [2],
        "prompt": "p",
    }
    for who in ("teacher", "tie"):
        for policy in ("keep", "drop", "flip"):
            assert apply_policy(pair, who, policy) is pair
    assert apply_policy(pair, "student", "keep") is pair
    assert apply_policy(pair, "student", "drop") is None
    assert apply_policy(pair, "student", "flip") == {
        "chosen": "s",
        "rejected": "t",
        "chosen_finish_reason": "eos",
        "rejected_finish_reason": "length",
        "chosen_score": 1.0,
        "rejected_score": 0.0,
        "chosen_ids": [2],
        "rejected_ids": [1],
        "prompt": "p",
    }
    assert pair["chosen"] == "t"  # the input is not modified
    with pytest.raises(ValueError, match="unknown policy"):
        apply_policy(pair, "student", "swap")


def test_tiny_task_scorers():
    from plad_ray.verifiers import tiny_answer, tiny_exact, tiny_similarity

    assert tiny_answer("abc>") == "cba" and tiny_answer("12+345=") == "357" and tiny_answer("hello") is None
    assert tiny_exact("12+345=", "357") == 1.0 and tiny_exact("12+345=", "356") == 0.0
    assert tiny_similarity("12+345=", "356") == pytest.approx(2 / 3)  # one substitution in three characters
    assert tiny_similarity("abcd>", "dcba") == 1.0 and tiny_similarity("abcd>", "") == 0.0
    assert get_scorer("tiny_similarity") is tiny_similarity
