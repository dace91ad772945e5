"""The statistics behind a comparison of objectives: pure numpy, no I/O.

Every figure starts from per-prompt scores of two arms on the same test prompts, one row per seed, where an
arm's seed fixes its initial student, its samples and its data order (a's and b's run of seed s share them):
`diffs[s, p] = score_a[s, p] - score_b[s, p]`.

- `hierarchical_bootstrap`: the interval of the mean difference when both the seeds and the prompts are
  samples: each resample draws seeds with replacement, then prompts with replacement within each drawn seed.
  Resampling prompts alone (what the quality benchmark did until 2026-12-07) treats three seeds as the
  whole population of training runs, and its intervals were narrower than the spread between two runs.
- `noise_floor`: the A/A control (the same objective twice, another seed for data order) tells how far apart
  two arms land when nothing differs; its interval's largest magnitude is the floor a real difference must
  clear.
- `verdict`: the rule, stated before the run.
- `next_rates`: the learning-rate grid widens until each arm's best dev rate is inside it.
"""

from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
GRID_FACTOR = 3.0  # the grid's spacing: 1e-4, 3e-4, 1e-3, ... (a factor of about 3)
RATE_BOUNDS = (1e-7, 1e-1)  # the grid never widens past these


def paired_differences(a: list[list[float]], b: list[list[float]]) -> np.ndarray:
    """[seeds, prompts] differences a - b from per-seed lists of per-prompt scores (the same prompts, in the same
    order, in every list)."""
    a_, b_ = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_.ndim != 2 or a_.shape != b_.shape:
        raise ValueError(f"scores must be [seeds, prompts] of one shape each, got {a_.shape} and {b_.shape}")
    if not (np.isfinite(a_).all() and np.isfinite(b_).all()):
        raise ValueError("scores must be finite: a prompt without a score cannot be paired")
    return a_ - b_


def hierarchical_bootstrap(
    diffs: np.ndarray, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0, chunk: int = 256
) -> dict:
    """Mean difference over seeds and prompts, and its `level` percentile interval from `resamples` two-level
    resamples (seeds, then prompts within each seed); `per_seed` are the seeds' own means. With one seed the
    seed level is a single fixed draw, and the interval is the prompts-only one."""
    d = np.asarray(diffs, dtype=float)
    seeds, prompts = d.shape
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, chunk):  # chunks: chunk x seeds x prompts indices at a time, not all of them
        n = min(chunk, resamples - start)
        drawn_seeds = rng.integers(seeds, size=(n, seeds, 1))
        drawn_prompts = rng.integers(prompts, size=(n, seeds, prompts))
        means[start : start + n] = d[drawn_seeds, drawn_prompts].mean(axis=(1, 2))
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {
        "mean": float(d.mean()),
        "low": float(low),
        "high": float(high),
        "level": level,
        "per_seed": [float(m) for m in d.mean(axis=1)],
        "seeds": seeds,
        "prompts": prompts,
        "resamples": resamples,
    }


def noise_floor(aa: dict) -> float:
    """The largest difference the A/A control's interval allows: what two runs of one objective can differ by
    with nothing changed but the seed of their data order."""
    return max(abs(aa["low"]), abs(aa["high"]))


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "better" | "worse" | "no difference shown"
    why: str


def verdict(ci: dict, floor: float) -> Verdict:
    """The rule, written into the result before any arm trains: an arm beats the default only if its mean
    difference is above the A/A noise floor and its interval lies above 0; it is worse only if the mirror image
    holds; anything else shows no difference."""
    above, below = ci["mean"] > floor and ci["low"] > 0, ci["mean"] < -floor and ci["high"] < 0
    outcome = "better" if above else "worse" if below else "no difference shown"
    why = (
        f"mean difference {ci['mean']:+.4f} against an A/A noise floor of {floor:.4f}; "
        f"{ci['level']:.0%} interval [{ci['low']:+.4f}, {ci['high']:+.4f}] over {ci['seeds']} seed(s) x "
        f"{ci['prompts']} prompts"
    )
    return Verdict(outcome, why)


def best_rate(dev: dict[float, float]) -> float:
    """The rate with the highest dev score (ties: the smaller rate, the safer one)."""
    return max(dev, key=lambda lr: (dev[lr], -lr))


def next_rates(dev: dict[float, float], factor: float = GRID_FACTOR, bounds: tuple = RATE_BOUNDS) -> list[float]:
    """The rates to try next so that the best dev rate ends up inside the grid: a step below the lowest rate when
    it is the best, above the highest when that is (both, for a grid of one); none once the best is an inner
    point, or its side is at a bound. Call it after each round of the grid until it returns []."""
    rates, best = sorted(dev), best_rate(dev)
    more = []
    if best == rates[0] and best / factor >= bounds[0]:
        more.append(_round(best / factor))
    if best == rates[-1] and best * factor <= bounds[1]:
        more.append(_round(best * factor))
    return more


def _round(rate: float) -> float:
    return float(f"{rate:.3g}")
