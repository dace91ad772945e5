"""Scores s(y | x) of outputs, for the margin loss and for checking the teacher-wins assumption.

PLaD assumes the teacher's output beats the student's. Where a task has a scorer (a
verifier of exact answers here), the assumption can be checked per pair: the teacher
wins, ties, or the student wins; `policy` then keeps, drops or flips the pairs the
student won. Scorers are chosen by name from `SCORERS` (config values are never
evaluated as code). Pure functions over strings.
"""

from typing import Callable


def reverse_verifier(prompt: str, output: str) -> float:
    """The tiny task (configs/prompts/tiny-reverse.jsonl): "abc>" is answered "cba". 1.0 if right, else 0.0."""
    return float(output == prompt.removesuffix(">")[::-1])


SCORERS: dict[str, Callable[[str, str], float]] = {"reverse": reverse_verifier}
VERDICTS = ("teacher", "tie", "student")
POLICIES = ("keep", "drop", "flip")


def get_scorer(name: str) -> Callable[[str, str], float]:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}: expected one of {', '.join(SCORERS)}")
    return SCORERS[name]


def verdict(chosen_score: float, rejected_score: float) -> str:
    """Who wrote the better output: teacher (chosen), tie, or student (rejected)."""
    return "teacher" if chosen_score > rejected_score else "student" if rejected_score > chosen_score else "tie"


def apply_policy(pair: dict, who: str, policy: str) -> dict | None:
    """A pair the student won, under `policy`: keep as is, drop (None), or flip chosen and rejected."""
    if who != "student" or policy == "keep":
        return pair
    if policy == "drop":
        return None
    if policy == "flip":
        swapped = dict(pair)
        for a, b in (("chosen", "rejected"), ("chosen_finish_reason", "rejected_finish_reason"),
                     ("chosen_score", "rejected_score")):
            swapped[a], swapped[b] = pair[b], pair[a]
        return swapped
    raise ValueError(f"unknown policy {policy!r}: expected one of {', '.join(POLICIES)}")
