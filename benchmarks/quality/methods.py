"""The methods the quality benchmark compares, each a set of train.* overrides on the same pairs.

Every method trains the same initial student on the same prompts, with the same optimizer,
schedule, precision, number of optimizer steps and pairs per step; only the objective (and
the learning rate, chosen per method on the dev split) differs. `pairs` names the training
data: the greedy teacher's pairs (`teacher`), the T=0.7 teacher's (`teacher_t07`), or labelled
references in place of teacher outputs (`labelled`). `scored` methods also read the teacher's
log-probs and top 20 of those pairs' sequences (the engine's scoring stage, teacher.score_samples).
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    name: str
    overrides: tuple[str, ...]
    pairs: str = "teacher"
    family: str = "PLaD"  # PLaD | baseline
    scored: bool = False  # trains on the teacher's scores of the greedy teacher's pairs (train.teacher_scores)


METHODS = (
    Method("PLaD hinge (no NLL, the old default)", ("train.loss.type=hinge", "train.loss.nll_weight=0")),
    Method("PLaD hinge + NLL", ("train.loss.type=hinge", "train.loss.nll_weight=1")),
    Method(
        "PLaD per-token hinge + NLL",
        ("train.loss.type=hinge", "train.loss.length_normalize=true", "train.loss.beta=0.5", "train.loss.nll_weight=1"),
    ),
    Method(
        "PLaD graded margin + NLL",
        ("train.loss.type=margin", "train.scorer=tiny_similarity", "train.loss.nll_weight=1"),
    ),
    # 4 prompts x 4 samples = 16 pairs per step, as the pairwise methods' 16.
    Method(
        "PLaD listwise K=4 + NLL", ("train.loss.type=listwise", "train.loss.nll_weight=1", "train.micro_batch_size=4")
    ),
    Method(
        "PLaD imperfect teacher (T=0.7, student_wins=drop) + NLL",
        ("train.loss.type=hinge", "train.loss.nll_weight=1", "train.scorer=tiny_exact", "train.student_wins=drop"),
        pairs="teacher_t07",
    ),
    # The margin of "graded margin + NLL" with s(y) the teacher's mean log-prob per token of y: no verifier.
    Method(
        "PLaD teacher-judged margin + NLL",
        ("train.loss.type=margin", "train.scorer=teacher", "train.loss.nll_weight=1"),
        scored=True,
    ),
    Method("SeqKD", ("train.loss.type=seqkd",), family="baseline"),
    Method("token KD", ("train.loss.type=token_kd",), family="baseline"),
    Method("SFT on labelled references", ("train.loss.type=seqkd",), pairs="labelled", family="baseline"),
    # On the student's own samples, per token over the teacher's top 20 plus the rest (GKD's on-policy setting).
    Method(
        "on-policy KD (reverse KL, teacher top-20)",
        ("train.loss.type=onpolicy_kd", "train.loss.divergence=reverse_kl"),
        family="baseline",
        scored=True,
    ),
    # DistiLLM-2: skew KL pulling the teacher's output up, skew reverse KL pushing the student's sample down.
    Method(
        "contrastive (DistiLLM-2, teacher top-20)", ("train.loss.type=contrastive",), family="baseline", scored=True
    ),
)
LEARNING_RATES = (1e-4, 3e-4, 1e-3)  # the dev grid, seed 0 only; the student stopped near lr 1.6e-3 of its SFT


def by_name(name: str) -> Method:
    for method in METHODS:
        if method.name == name:
            return method
    raise KeyError(name)


def slug(name: str) -> str:
    keep = [c if c.isalnum() else "-" for c in name.lower()]
    return "-".join(part for part in "".join(keep).split("-") if part)[:48]


@dataclass
class Grid:
    """The learning rate each method won on dev (seed 0), with every dev figure behind the choice."""

    chosen: dict = field(default_factory=dict)  # method name -> lr
    dev: dict = field(default_factory=dict)  # method name -> {lr: dev primary metric}
