"""Generation-quality metrics. Pure functions over strings and numbers (no torch, ray or vllm).

    exact match     normalised output == normalised reference
    ROUGE-L         F-measure of the longest common subsequence of word tokens (rouge-score)
    edit similarity 1 - Levenshtein(output, reference) / max(|output|, |reference|), a graded score
    win rate        (wins + ties / 2) / n, one model's score against another's on the same prompt
    ECE             sum_b |B_b|/n * |accuracy(B_b) - confidence(B_b)| over equal-width confidence bins
    AUROC           P(confidence of a correct output > that of a wrong one), ties half
    best-of-n       correctness of the sample the model itself is most sure of (highest mean log-prob)
    paired bootstrap a 95% interval of mean(a - b) over prompts, resampled with replacement

Confidence is the length-normalised sequence likelihood of the model's own output,
exp(mean token log-prob); correctness is the verifier's verdict (or exact match). ECE and
AUROC say nothing when every output is wrong (or every one right): a model then lowers its
ECE by growing less sure of wrong answers. `calibration_note` says when that is the case.
"""

import math
import re


def normalize(text: str) -> str:
    """Case- and whitespace-insensitive form used by exact match."""
    return " ".join(text.lower().split())


def exact_match(output: str, reference: str) -> float:
    return float(normalize(output) == normalize(reference))


class _Words:
    """ROUGE tokens: lower-cased runs of Unicode word characters. rouge-score's default tokenizer keeps only
    [a-z0-9] (English): it would score any non-Latin answer as empty."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return _WORD.findall(text.lower())


_WORD = re.compile(r"\w+")
_ROUGE = None


def correctness_of(row: dict, text: str, scorer=None) -> float | None:
    """Whether one output for a held-out row is correct (1.0 or 0.0): the verifier's full score when one is given,
    else exact match against the row's reference; None when there is neither."""
    if scorer is not None:
        return float(scorer(row["prompt"], text) >= 1.0)
    return None if row["reference"] is None else exact_match(text, row["reference"])


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F1 (Google's rouge-score, on word tokens: punctuation and case ignored, "Rome." = "Rome");
    1.0 when both have no words."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Words())
    if not _Words.tokenize(output) and not _Words.tokenize(reference):
        return 1.0
    return _ROUGE.score(reference, output)["rougeL"].fmeasure


def win_rate(student_scores: list[float], teacher_scores: list[float]) -> dict:
    """How often the student's output scored above the teacher's on the same prompt (ties count half)."""
    wins = sum(s > t for s, t in zip(student_scores, teacher_scores))
    ties = sum(s == t for s, t in zip(student_scores, teacher_scores))
    n = len(student_scores)
    return {"wins": wins, "ties": ties, "losses": n - wins - ties, "win_rate": (wins + ties / 2) / n if n else math.nan}


def confidence(mean_token_logprob: float) -> float:
    """Length-normalised sequence likelihood exp(log P(y|x) / |y|), in (0, 1]."""
    return math.exp(min(mean_token_logprob, 0.0))


def reliability_bins(confidences: list[float], correct: list[float], num_bins: int = 10) -> list[dict]:
    """Equal-width bins over [0, 1]: count, mean confidence and accuracy of the outputs in each.

    Bin b holds confidences in [b/n, (b+1)/n); a confidence of exactly 1 goes in the last bin.
    """
    bins = [
        {"lower": b / num_bins, "upper": (b + 1) / num_bins, "count": 0, "confidence": 0.0, "accuracy": 0.0}
        for b in range(num_bins)
    ]
    for c, ok in zip(confidences, correct):
        b = bins[min(int(c * num_bins), num_bins - 1)]
        b["count"] += 1
        b["confidence"] += c
        b["accuracy"] += ok
    for b in bins:
        if b["count"]:
            b["confidence"] /= b["count"]
            b["accuracy"] /= b["count"]
    return bins


def expected_calibration_error(confidences: list[float], correct: list[float], num_bins: int = 10) -> float:
    """ECE = sum over bins of |B_b|/n * |accuracy(B_b) - mean confidence(B_b)|."""
    n = len(confidences)
    if n == 0:
        return math.nan
    return sum(
        b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in reliability_bins(confidences, correct, num_bins)
    )


def calibration_note(correct: list[float]) -> str | None:
    """Why ECE/AUROC are uninformative for these outputs, or None when they mean something."""
    if not correct:
        return "no outputs"
    right = sum(1 for c in correct if c >= 1.0)
    if right == 0:
        return "uninformative: no output is correct, so ECE only measures how unsure the model is of wrong answers"
    if right == len(correct):
        return "uninformative: every output is correct, so ECE only measures how sure the model is"
    return None


def auroc(confidences: list[float], correct: list[float]) -> float:
    """Area under the ROC curve of confidence as a detector of correct outputs; nan without both kinds."""
    pos = [c for c, ok in zip(confidences, correct) if ok >= 1.0]
    neg = [c for c, ok in zip(confidences, correct) if ok < 1.0]
    if not pos or not neg:
        return math.nan
    order = sorted(pos + neg)
    # Mann-Whitney: average rank of the positives (ties share their mean rank).
    ranks, i = {}, 0
    while i < len(order):
        j = i
        while j < len(order) and order[j] == order[i]:
            j += 1
        ranks[order[i]] = (i + j + 1) / 2  # 1-based mean rank of positions i..j-1
        i = j
    rank_sum = sum(ranks[c] for c in pos)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def best_of_n(samples: list[list[tuple[float, float]]]) -> float:
    """Mean over prompts of the correctness of the sample with the highest mean token log-prob.

    `samples[p]` holds (mean log-prob, correct) of prompt p's samples; the first wins ties.
    """
    picked = [max(s, key=lambda x: x[0])[1] for s in samples if s]
    return mean(picked)


def paired_bootstrap(a: list[float], b: list[float], num_resamples: int = 10000, seed: int = 0) -> dict:
    """mean(a - b) over paired items and its 95% percentile interval (resampling items with replacement)."""
    import random

    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    if n == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(num_resamples))
    return {
        "mean": sum(diffs) / n,
        "low": means[int(0.025 * num_resamples)],
        "high": means[int(0.975 * num_resamples) - 1],
        "n": n,
    }


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
