"""Verifiers: scores s(y | x) of outputs, for the margin loss and for checking the teacher-wins assumption.

PLaD assumes the teacher's output beats the student's. Where a task has a scorer (a
verifier of exact answers here), the assumption can be checked per pair: the teacher
wins, ties, or the student wins; `policy` then keeps, drops or flips the pairs the
student won. Scorers are chosen by name from `SCORERS` (config values are never
evaluated as code). Pure functions over strings.
"""

from typing import Callable

from rapidfuzz.distance import Levenshtein


def edit_similarity(output: str, reference: str) -> float:
    """1 - Levenshtein distance / the longer length, in [0, 1]; 1.0 when both are empty (rapidfuzz's C++)."""
    return Levenshtein.normalized_similarity(output, reference)


def reverse_verifier(prompt: str, output: str) -> float:
    """The tiny task (configs/prompts/tiny-reverse.jsonl): "abc>" is answered "cba". 1.0 if right, else 0.0."""
    return float(output == prompt.removesuffix(">")[::-1])


def tiny_answer(prompt: str) -> str | None:
    """The exact answer of a tiny-task prompt: "abc>" -> "cba" (reversal), "12+345=" -> "357" (addition)."""
    if prompt.endswith(">"):
        return prompt[:-1][::-1]
    head, plus, tail = prompt.removesuffix("=").partition("+")
    if prompt.endswith("=") and plus and head.isdigit() and tail.isdigit():
        return str(int(head) + int(tail))
    return None


def tiny_exact(prompt: str, output: str) -> float:
    """1.0 if the output is the tiny task's exact answer (reversal or addition), else 0.0."""
    return float(output == tiny_answer(prompt))


def tiny_similarity(prompt: str, output: str) -> float:
    """A graded score in [0, 1]: normalised edit similarity to the exact answer (1.0 = exact)."""
    answer = tiny_answer(prompt)
    return 0.0 if answer is None else edit_similarity(output, answer)


SCORERS: dict[str, Callable[[str, str], float]] = {
    "reverse": reverse_verifier,
    "tiny_exact": tiny_exact,
    "tiny_similarity": tiny_similarity,
}
# s(y) = the teacher's mean log-prob per token of y, read from the run's teacher_scores/ (teacher.score_samples)
# rather than computed from text: a teacher-judged margin that needs no verifier (plad_ray.losses.teacher_scores).
TEACHER = "teacher"
VERDICTS = ("teacher", "tie", "student")
POLICIES = ("keep", "drop", "flip")


def get_scorer(name: str) -> Callable[[str, str], float] | str:
    if name == TEACHER:
        return TEACHER
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
    if policy == "flip":  # every chosen* field trades places with its rejected* twin
        swapped = dict(pair)
        for key in pair:
            if key.startswith("chosen"):
                twin = "rejected" + key[len("chosen") :]
                swapped[key], swapped[twin] = pair[twin], pair[key]
        return swapped
    raise ValueError(f"unknown policy {policy!r}: expected one of {', '.join(POLICIES)}")


def judge_pairs(
    rows: list[dict], scorer: Callable[[str, str], float] | str | None, student_wins: str
) -> tuple[list[dict], list[str], list[bool]]:
    """Score both sides of every pair (rows with prompt, chosen, rejected), say who won, and apply the
    student-wins policy: (rows with chosen_score/rejected_score, verdicts, dropped flags). Without a
    scorer the rows are returned as they are, every verdict '' and nothing dropped. With the TEACHER
    scorer the rows already carry their scores (`chosen_score`, `rejected_score`)."""
    if scorer is None:
        return rows, [""] * len(rows), [False] * len(rows)
    scored, verdicts, dropped = [], [], []
    for row in rows:
        if scorer != TEACHER:
            row = {
                **row,
                "chosen_score": scorer(row["prompt"], row["chosen"]),
                "rejected_score": scorer(row["prompt"], row["rejected"]),
            }
        who = verdict(row["chosen_score"], row["rejected_score"])
        kept = apply_policy(row, who, student_wins)
        verdicts.append(who)
        dropped.append(kept is None)
        scored.append(kept or row)
    return scored, verdicts, dropped
