"""The quality benchmark's pure analysis (benchmarks/quality/analysis.py): figures and the decision rule."""

import pytest

from benchmarks.quality import analysis


def test_split_metrics_and_win_rate_vs_initial_by_hand():
    rec = {
        "ids": ["a", "b", "c", "d"],
        "correct": [1.0, 0.0, 1.0, 0.0],
        "graded": [1.0, 0.5, 1.0, 0.25],
        "confidence": [0.9, 0.8, 0.6, 0.1],
        "sampled": [0.5, 0.0, 1.0, 0.0],
        "best_of_n": [1.0, 0.0, 1.0, 0.0],
    }
    initial = {**rec, "graded": [0.5, 0.5, 1.0, 0.5]}
    m = analysis.split_metrics(rec, initial)
    assert (m["accuracy"], m["graded"], m["sampled"], m["best_of_n"]) == (0.5, 0.6875, 0.375, 0.5)
    # AUROC: correct at 0.9, 0.6 vs wrong at 0.8, 0.1 -> (0.9>0.8, 0.9>0.1, 0.6<0.8, 0.6>0.1) = 3/4.
    assert m["auroc"] == pytest.approx(0.75)
    # Graded vs the initial student per prompt: win, tie, tie, loss -> (1 + 2/2) / 4.
    assert m["win_vs_initial"] == pytest.approx(0.5)
    sub = analysis.split_metrics(analysis.select(rec, {"a", "b"}))
    assert sub["prompts"] == 2 and sub["accuracy"] == 0.5 and "win_vs_initial" not in sub


def test_the_decision_rule_needs_the_margin_the_interval_and_every_seed():
    # PLaD right on 60 of 100 prompts, SeqKD on 50 (the same 50 plus 10 more), on each of three seeds.
    a = [{"correct": [1.0] * 60 + [0.0] * 40}] * 3
    b = [{"correct": [1.0] * 50 + [0.0] * 50}] * 3
    ci = analysis.paired_difference(a, b, num_resamples=500)
    assert ci["mean"] == pytest.approx(0.10) and ci["per_seed"] == pytest.approx([0.10] * 3)
    assert 0 < ci["low"] < 0.10 < ci["high"]
    assert analysis.decision(ci)[0] is True
    # One seed below zero sinks it, whatever the mean.
    assert analysis.decision({**ci, "per_seed": [0.2, 0.2, -0.01]})[0] is False
    # So does a difference under two points, and an interval reaching zero.
    assert analysis.decision({**ci, "mean": 0.015})[0] is False
    assert analysis.decision({**ci, "low": 0.0})[0] is False
