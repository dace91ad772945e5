"""Each `train.loss.type`, declared once: what it trains, what it reads, what it needs.

The config validates names against `OBJECTIVES`; the pair preparation, the feed, the held-out scoring, the
checks and the model card ask an objective's properties here, never its name.

Two families. Ranking objectives train a ranking loss over (chosen, rejected) log-probs, plus
`nll_weight` x the NLL of the chosen output. Per-token objectives train one per-token term instead
(their ranking loss, the hinge, is computed and reported, not trained, and `nll_weight` does not apply).
"""

from dataclasses import dataclass

# What a per-token objective trains (`token_term`): the chosen output's NLL, the forward KL to a local
# teacher's logits, or a divergence over the teacher's top-k log-probs of the pairs.
NLL, TEACHER_LOGITS, TOPK = "nll", "teacher_logits", "topk"


@dataclass(frozen=True)
class Objective:
    name: str
    ranking: str  # the ranking loss computed: hinge, logistic, margin, listwise or dpo
    token_term: str | None = None  # None: the ranking loss is trained; else NLL, TEACHER_LOGITS or TOPK
    topk_sides: tuple[str, ...] = ()  # whose teacher top-k it reads: the samples' (rejected), or both sides
    reference: bool = False  # its log-probs are ratios to a frozen reference, the round's initial student (dpo)
    summary: str = ""  # what it trains, in a few words (the model card's for the per-token ones)

    @property
    def trains_ranking(self) -> bool:
        return self.token_term is None

    @property
    def per_token(self) -> bool:
        """Its trained objective is a mean over response tokens (else over ranked pairs)."""
        return self.token_term is not None

    @property
    def groups_samples(self) -> bool:
        """A row is a prompt with all its samples (listwise), not a pair."""
        return self.ranking == "listwise"

    @property
    def reads_topk(self) -> bool:
        return bool(self.topk_sides)

    @property
    def needs_local_teacher(self) -> bool:
        """The teacher's full token distribution, beside the student in each rank."""
        return self.token_term == TEACHER_LOGITS

    @property
    def needs_reference(self) -> bool:
        """The initial student, frozen, beside the student in each rank: log P(y|x) - log P_ref(y|x)."""
        return self.reference

    @property
    def needs_scores(self) -> bool:
        """Scores s(y) of both sides (train.scorer)."""
        return self.ranking == "margin"

    @property
    def scale_key(self) -> str:
        """The train.loss key that scales its ranking loss: gamma for the logistic loss, else beta."""
        return "gamma" if self.ranking == "logistic" else "beta"

    @property
    def topk_tokens_side(self) -> str:
        """Whose scored tokens its per-token mean runs over: the samples' for onpolicy_kd, else the chosen ones'."""
        return "rejected" if self.topk_sides == ("rejected",) else "chosen"

    def trains_nll(self, nll_weight: float) -> bool:
        """It trains the chosen output's NLL: seqkd, or a ranking objective with nll_weight > 0."""
        return self.token_term == NLL or (self.trains_ranking and nll_weight > 0)

    def trains_identical_pairs(self, nll_weight: float) -> bool:
        """A pair whose two sides are the same text still teaches: it has no ranking signal, but an NLL or
        per-token term trains on it."""
        return self.per_token or self.trains_nll(nll_weight)


OBJECTIVES = {
    o.name: o
    for o in (
        Objective("hinge", "hinge", summary="hinge (PLaD's ranking calibration: the teacher output above the sample)"),
        Objective("margin", "margin", summary="margin (the hinge with margin beta x (s(chosen) - s(rejected)))"),
        Objective("logistic", "logistic", summary="logistic (-log sigmoid of gamma x the log-prob gap)"),
        Objective("listwise", "listwise", summary="listwise (the teacher output above each of a prompt's samples)"),
        Objective("dpo", "dpo", reference=True, summary="dpo (DPO on the pairs, the initial student as reference)"),
        Objective("seqkd", "hinge", NLL, summary="seqkd (NLL of the teacher's outputs)"),
        Objective(
            "token_kd",
            "hinge",
            TEACHER_LOGITS,
            summary="token_kd (forward KL to the teacher's token distribution on its outputs)",
        ),
        Objective(
            "onpolicy_kd",
            "hinge",
            TOPK,
            ("rejected",),
            summary="onpolicy_kd (divergence to the teacher's top-k on the student's samples)",
        ),
        Objective(
            "contrastive",
            "hinge",
            TOPK,
            ("chosen", "rejected"),
            summary="contrastive (skew KL to the teacher's top-k on its outputs and the student's samples)",
        ),
    )
}
LOSS_TYPES = tuple(OBJECTIVES)


def objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"loss type {name!r}: expected one of {', '.join(LOSS_TYPES)}") from None
