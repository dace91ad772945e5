"""Pure analysis of the quality benchmark: per-prompt records -> split metrics, tables, the decision.

A record holds, per held-out prompt of one evaluated model: greedy correctness and graded
score, confidence (exp mean token log-prob of the greedy output), the mean correctness of its
samples at T=1, and the correctness of the sample it is surest of (best-of-n).
"""

import math
import statistics

from plad_ray.evaluation.metrics import auroc, confidence, expected_calibration_error, win_rate

PRIMARY = "accuracy"  # greedy verifier accuracy on the test split: the pre-registered primary metric
COLUMNS = (
    ("accuracy", "greedy acc."),
    ("graded", "graded score"),
    ("sampled", "sampled acc."),
    ("best_of_n", "best-of-8 acc."),
    ("ece", "ECE"),
    ("auroc", "AUROC"),
    ("win_vs_initial", "win rate vs initial"),
    ("nll_drift", "Δ teacher-output NLL/token"),
    ("tokens", "tokens trained"),
    ("lr", "lr (dev)"),
)


def record(ids: list[str], outputs: list[dict], rows: list[dict], exact, graded) -> dict:
    """A model's per-prompt record from the evaluate stage's outputs (same order as `rows`)."""
    rec = {"ids": ids, "correct": [], "graded": [], "confidence": [], "sampled": [], "best_of_n": []}
    for row, out in zip(rows, outputs):
        rec["correct"].append(exact(row["prompt"], out["text"]))
        rec["graded"].append(graded(row["prompt"], out["text"]))
        rec["confidence"].append(None if out["mean_logprob"] is None else confidence(out["mean_logprob"]))
        samples = out.get("samples") or []
        right = [exact(row["prompt"], s["text"]) for s in samples]
        rec["sampled"].append(sum(right) / len(right) if right else math.nan)
        rec["best_of_n"].append(
            right[max(range(len(samples)), key=lambda k: samples[k]["mean_logprob"])] if samples else math.nan
        )
    return rec


def select(rec: dict, ids: set[str]) -> dict:
    keep = [i for i, x in enumerate(rec["ids"]) if x in ids]
    return {k: [v[i] for i in keep] for k, v in rec.items()}


def split_metrics(rec: dict, initial: dict | None = None) -> dict:
    """Figures of one model on one split (records already restricted to it)."""
    n = len(rec["ids"])
    out = {
        "prompts": n,
        "accuracy": _mean(rec["correct"]),
        "graded": _mean(rec["graded"]),
        "sampled": _mean(rec["sampled"]),
        "best_of_n": _mean(rec["best_of_n"]),
    }
    if all(c is not None for c in rec["confidence"]):  # None: not measured (the teacher's cached outputs)
        out.update(
            ece=expected_calibration_error(rec["confidence"], rec["correct"], 10),
            auroc=auroc(rec["confidence"], rec["correct"]),
        )
    if initial is not None:
        out["win_vs_initial"] = win_rate(rec["graded"], initial["graded"])["win_rate"]
    return out


def _mean(values: list[float]) -> float:
    values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else math.nan


def mean_sd(values: list[float], count: bool = False) -> str:
    """mean ± sample sd (one value: itself); `count`s as integers, the rest to 3 decimals."""
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    fmt = (lambda v: f"{v:,.0f}") if count else (lambda v: f"{v:.3f}")
    if not values:
        return "-"
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))}"


def table(rows: list[tuple[str, list[dict]]]) -> str:
    """Markdown: one row per model, mean ± sd over seeds of each column."""
    lines = ["| | " + " | ".join(title for _, title in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name, per_seed in rows:
        cells = []
        for key, _ in COLUMNS:
            values = [s.get(key) for s in per_seed if s.get(key) is not None]
            cells.append(f"{values[0]:g}" if key == "lr" and values else mean_sd(values, count=key == "tokens"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_difference(
    a_by_seed: list[dict], b_by_seed: list[dict], key: str = "correct", seed: int = 0, num_resamples: int = 10000
) -> dict:
    """Mean over seeds of (a - b) on the same test prompts, its 95% hierarchical paired-bootstrap interval
    (seeds, then prompts within each seed: plad_ray.compare.stats), and the per-seed differences."""
    from plad_ray.compare import stats

    diffs = stats.paired_differences([a[key] for a in a_by_seed], [b[key] for b in b_by_seed])
    return stats.hierarchical_bootstrap(diffs, resamples=num_resamples, seed=seed)


def decision(ci: dict, threshold: float = 0.02) -> tuple[bool, str]:
    """The pre-registered rule: PLaD wins iff its dev-chosen variant beats SeqKD by >= 2 points on test
    greedy accuracy (mean over seeds), the 95% CI of the difference is above 0, and no seed is negative."""
    checks = [
        (
            ci["mean"] >= threshold,
            f"mean difference {ci['mean']:+.3f} {'>=' if ci['mean'] >= threshold else '<'} {threshold:+.3f}",
        ),
        (ci["low"] > 0, f"95% CI [{ci['low']:+.3f}, {ci['high']:+.3f}] {'above' if ci['low'] > 0 else 'not above'} 0"),
        (all(d >= 0 for d in ci["per_seed"]), "per seed " + ", ".join(f"{d:+.3f}" for d in ci["per_seed"])),
    ]
    return all(ok for ok, _ in checks), "; ".join(text for _, text in checks)
