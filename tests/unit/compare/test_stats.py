"""plad_ray.compare.stats: the hierarchical bootstrap, the A/A floor, the verdict and the grid's widening."""

import numpy as np
import pytest

from plad_ray.compare import stats


def test_differences_pair_seed_by_seed_and_prompt_by_prompt():
    d = stats.paired_differences([[1, 0, 1], [0, 0, 1]], [[0, 0, 1], [1, 0, 1]])
    assert d.tolist() == [[1, 0, 0], [-1, 0, 0]]
    with pytest.raises(ValueError, match="one shape"):
        stats.paired_differences([[1, 0]], [[1, 0, 1]])
    with pytest.raises(ValueError, match="finite"):
        stats.paired_differences([[1.0, float("nan")]], [[1.0, 0.0]])


def test_the_interval_of_a_constant_difference_is_that_difference():
    ci = stats.hierarchical_bootstrap(np.full((3, 50), 0.25), resamples=200)
    assert (ci["mean"], ci["low"], ci["high"]) == pytest.approx((0.25, 0.25, 0.25))
    assert ci["per_seed"] == pytest.approx([0.25] * 3) and (ci["seeds"], ci["prompts"]) == (3, 50)


def test_seeds_that_disagree_widen_the_interval():
    # The same prompt-level noise around each seed's mean: first the seeds agree, then they do not.
    rng = np.random.default_rng(0)
    noise = rng.choice([-1.0, 0.0, 1.0], size=(3, 1000), p=[0.2, 0.6, 0.2])
    agree = noise - noise.mean(axis=1, keepdims=True) + 0.04
    disagree = agree + np.array([[0.08], [-0.06], [-0.02]])  # seed means 0.12, -0.02, 0.02: the same overall mean
    a, b = stats.hierarchical_bootstrap(agree, resamples=4000), stats.hierarchical_bootstrap(disagree, resamples=4000)
    assert a["mean"] == pytest.approx(b["mean"])
    assert b["high"] - b["low"] > 2 * (a["high"] - a["low"])  # prompts alone would give both the same width
    assert b["low"] < 0 < a["low"]  # the disagreeing seeds no longer show a difference


def test_with_many_seeds_the_half_width_is_the_seed_means_standard_error():
    # 40 seeds, seed effects of sd 0.05 and small prompt noise: the interval is about mean +- 1.96 sd / sqrt(40).
    rng = np.random.default_rng(1)
    seed_means = rng.normal(0.0, 0.05, size=(40, 1))
    d = seed_means + rng.normal(0.0, 0.01, size=(40, 300))
    ci = stats.hierarchical_bootstrap(d, resamples=4000)
    expected = 1.96 * d.mean(axis=1).std(ddof=1) / np.sqrt(40)
    assert (ci["high"] - ci["low"]) / 2 == pytest.approx(expected, rel=0.15)


def test_the_bootstrap_is_reproducible_from_its_seed():
    d = np.random.default_rng(2).choice([-1.0, 0.0, 1.0], size=(3, 100))
    assert stats.hierarchical_bootstrap(d, resamples=500, seed=7) == stats.hierarchical_bootstrap(
        d, resamples=500, seed=7
    )


def ci(mean, low, high):
    return {"mean": mean, "low": low, "high": high, "level": 0.95, "seeds": 3, "prompts": 1000}


def test_the_verdict_needs_the_floor_and_the_interval():
    floor = stats.noise_floor(ci(0.005, -0.012, 0.022))
    assert floor == 0.022  # the A/A interval's largest magnitude
    assert stats.verdict(ci(0.04, 0.01, 0.07), floor).outcome == "better"
    assert stats.verdict(ci(0.02, 0.01, 0.03), floor).outcome == "no difference shown"  # inside the A/A noise
    assert stats.verdict(ci(0.04, -0.01, 0.09), floor).outcome == "no difference shown"  # interval reaches 0
    worse = stats.verdict(ci(-0.041, -0.055, -0.027), floor)
    assert worse.outcome == "worse"
    assert worse.why == (
        "mean difference -0.0410 against an A/A noise floor of 0.0220; 95% interval [-0.0550, -0.0270] over "
        "3 seed(s) x 1000 prompts"
    )


def test_the_grid_widens_until_the_best_rate_is_inside():
    assert stats.next_rates({1e-4: 0.54, 3e-4: 0.50, 1e-3: 0.45}) == [3.33e-05]  # best at the bottom: below it
    assert stats.next_rates({1e-4: 0.59, 3e-4: 0.58, 1e-3: 0.60}) == [0.003]  # best at the top: above it
    assert stats.next_rates({1e-4: 0.59, 3e-4: 0.64, 1e-3: 0.56}) == []  # inside: done
    assert stats.next_rates({1e-4: 0.5}) == [3.33e-05, 0.0003]  # one rate: both sides
    assert stats.next_rates({1e-4: 0.6, 3e-4: 0.6}) == [3.33e-05]  # a tie goes to the smaller rate
    assert stats.next_rates({0.1: 0.6, 0.03: 0.5}) == []  # the top bound stops it
    assert stats.best_rate({1e-4: 0.6, 3e-4: 0.6, 1e-3: 0.2}) == 1e-4
