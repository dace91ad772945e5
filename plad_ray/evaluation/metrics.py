"""Generation-quality metrics. Pure functions over strings and numbers (no torch, ray or vllm).

    exact match     normalised output == normalised reference
    ROUGE-L         F-measure of the longest common subsequence of whitespace tokens
    win rate        (wins + ties / 2) / n, the student's score against the teacher's on the same prompt
    ECE             sum_b |B_b|/n * |accuracy(B_b) - confidence(B_b)| over equal-width confidence bins

Confidence is the length-normalised sequence likelihood of the model's own output,
exp(mean token log-prob); correctness is the verifier's verdict (or exact match).
"""

import math


def normalize(text: str) -> str:
    """Case- and whitespace-insensitive form used by exact match."""
    return " ".join(text.lower().split())


def exact_match(output: str, reference: str) -> float:
    return float(normalize(output) == normalize(reference))


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace tokens; 1.0 when both are empty."""
    out, ref = normalize(output).split(), normalize(reference).split()
    if not out or not ref:
        return float(out == ref)
    common = _lcs(out, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(out), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def win_rate(student_scores: list[float], teacher_scores: list[float]) -> dict:
    """How often the student's output scored above the teacher's on the same prompt (ties count half)."""
    wins = sum(s > t for s, t in zip(student_scores, teacher_scores))
    ties = sum(s == t for s, t in zip(student_scores, teacher_scores))
    n = len(student_scores)
    return {"wins": wins, "ties": ties, "losses": n - wins - ties,
            "win_rate": (wins + ties / 2) / n if n else math.nan}


def confidence(mean_token_logprob: float) -> float:
    """Length-normalised sequence likelihood exp(log P(y|x) / |y|), in (0, 1]."""
    return math.exp(min(mean_token_logprob, 0.0))


def reliability_bins(confidences: list[float], correct: list[float], num_bins: int = 10) -> list[dict]:
    """Equal-width bins over [0, 1]: count, mean confidence and accuracy of the outputs in each.

    Bin b holds confidences in [b/n, (b+1)/n); a confidence of exactly 1 goes in the last bin.
    """
    bins = [{"lower": b / num_bins, "upper": (b + 1) / num_bins, "count": 0, "confidence": 0.0, "accuracy": 0.0}
            for b in range(num_bins)]
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
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
               for b in reliability_bins(confidences, correct, num_bins))


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
