"""Sequence log-probabilities and the PLaD loss family. Pure torch: no ray, deepspeed or vllm.

PLaD (Zhang et al., 2024) trains the student to rank the teacher's output y+ above its own sample y- under
its own sequence likelihood, log P(y|x) = sum_t log p(y_t | x, y_<t) over response tokens only. The losses
take per-sequence log-probs [B] (B pairs; [B, K] for K samples per prompt) and return the mean over pairs:

    hinge (ranking calibration, PLaD eq. 3)   max(0, beta - log P(y+|x) + log P(y-|x))
    margin calibration, score s               max(0, beta*(s(y+) - s(y-)) - log P(y+|x) + log P(y-|x))
    logistic                                  -log sigmoid(gamma * (log P(y+|x) - log P(y-|x)))
    listwise (y+ above each of K samples)     mean_k max(0, beta - log P(y+|x) + log P(y-_k|x))
    dpo (the logistic loss on log-ratios      -log sigmoid(beta * (log P(y+|x)/P_ref(y+|x) - log P(y-|x)/P_ref(y-|x)))
      to a frozen reference, Rafailov 2023)
    NLL (per token; seqkd, or lambda x NLL)   -log P(y+|x) / |y+|

`length_normalized` turns summed log-probs into means per token (beta then a margin per token, SimPO-style).
`plad_loss` is the objective the workers call, for every train.loss.type (plad_ray.objectives); the per-token
terms it may train instead are in plad_ray.losses_token. Why the NLL term is on by default: README
"Choosing the objective". Tensor names carry their shape: B pairs, K samples, T positions, V vocabulary.

What reads [B, T, V] logits (`sequence_logps`, `topk_token_logps`) computes only the scored positions, in fp32
chunks forward and backward, with no fp32 copy of the whole tensor; the `dense_*` functions are the
one-expression references they are tested and benchmarked against.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from plad_ray.config_train import LossConfig
from plad_ray.objectives import NLL, Objective, objective

LOGPS_CHUNK_BYTES = 1 << 28  # fp32 working set per chunk of scored positions (256 MiB)


def sequence_logps(
    logits_BTV: torch.Tensor,
    input_ids_BT: torch.Tensor,
    response_mask_BT: torch.Tensor,
    chunk_bytes: int = LOGPS_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's response tokens, and how many there are.

    `response_mask_BT` is 1 on the tokens whose probability counts (the response,
    including its EOS when the output stopped), 0 on prompt and padding. Position t's
    logits predict token t+1, so the first token of a sequence is never scored.

    Memory-bounded: only the scored positions are computed, in chunks of about
    `chunk_bytes` of fp32, forward and backward (`_ScoredLogps`). Nothing of size
    [B, T, V] is allocated beyond the logits and, in backward, their gradient (both in the
    logits' dtype); `dense_sequence_logps` is the same formula over the whole tensor.
    """
    mask_BT = response_mask_BT[:, 1:] > 0
    rows_b, rows_t = mask_BT.nonzero(as_tuple=True)
    targets_N1 = input_ids_BT[rows_b, rows_t + 1, None]
    token_logps_N = _ScoredLogps.apply(logits_BTV, rows_b, rows_t, targets_N1, chunk_bytes)[:, 0]
    token_logps_BT = token_logps_N.new_zeros(mask_BT.shape).index_put((rows_b, rows_t), token_logps_N)
    return token_logps_BT.sum(-1), mask_BT.to(token_logps_BT.dtype).sum(-1)


def _chunk_rows(chunk_bytes: int, vocab: int, blocks: int = 1) -> int:
    """Positions per chunk: `blocks` fp32 [rows, V] blocks in about `chunk_bytes`."""
    return max(1, chunk_bytes // (4 * vocab * blocks))


class _ScoredLogps(torch.autograd.Function):
    """log p(ids_k) for k ids per scored position (rows_b, rows_t) of the logits, in fp32, a chunk of
    positions at a time: one id (the token there) for `sequence_logps`, the teacher's top-k for
    `topk_token_logps`. Saves the logits (no copy) and one log-normaliser per scored position; backward
    writes onehot-scatter(g_k) - softmax * sum_k g_k chunk by chunk into the logits' gradient.
    Written by hand because autograd through logsumexp keeps an fp32 [B, T, V] copy alive."""

    @staticmethod
    def forward(ctx, logits_BTV, rows_b, rows_t, ids_Nk, chunk_bytes):
        n, vocab = ids_Nk.shape[0], logits_BTV.shape[-1]
        chunk = _chunk_rows(chunk_bytes, vocab)
        logps_Nk = torch.empty(ids_Nk.shape, dtype=torch.float32, device=logits_BTV.device)
        lse_N = torch.empty(n, dtype=torch.float32, device=logits_BTV.device)
        for start in range(0, n, chunk):
            span = slice(start, start + chunk)
            block_CV = logits_BTV[rows_b[span], rows_t[span]].float()
            lse_N[span] = torch.logsumexp(block_CV, -1)
            logps_Nk[span] = block_CV.gather(1, ids_Nk[span]) - lse_N[span, None]
        ctx.save_for_backward(logits_BTV, rows_b, rows_t, ids_Nk, lse_N)
        ctx.chunk = chunk
        return logps_Nk

    @staticmethod
    def backward(ctx, grad_Nk):
        logits_BTV, rows_b, rows_t, ids_Nk, lse_N = ctx.saved_tensors
        grad_BTV = torch.zeros_like(logits_BTV)
        for start in range(0, ids_Nk.shape[0], ctx.chunk):
            span = slice(start, start + ctx.chunk)
            g_Ck = grad_Nk[span].float()
            block_CV = logits_BTV[rows_b[span], rows_t[span]].float()
            block_CV = block_CV.sub_(lse_N[span, None]).exp_().mul_(-g_Ck.sum(1, keepdim=True))  # -softmax * sum_k g_k
            block_CV.scatter_add_(1, ids_Nk[span], g_Ck)
            grad_BTV[rows_b[span], rows_t[span]] = block_CV.to(grad_BTV.dtype)
        return grad_BTV, None, None, None, None


def dense_sequence_logps(
    logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor, response_mask_BT: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` as one expression over the whole [B, T, V] tensor in fp32 (gather -
    logsumexp). The reference the chunked function is tested and benchmarked against."""
    logits = logits_BTV[:, :-1].float()
    targets_BT = input_ids_BT[:, 1:]
    mask_BT = response_mask_BT[:, 1:].to(logits.dtype)
    token_logps_BT = torch.gather(logits, 2, targets_BT.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    return (token_logps_BT * mask_BT).sum(-1), mask_BT.sum(-1)


def topk_token_logps(
    logits_NTV: torch.Tensor,
    topk_ids_NTk: torch.Tensor,
    topk_mask_NT: torch.Tensor,
    chunk_bytes: int = LOGPS_CHUNK_BYTES,
) -> torch.Tensor:
    """The student's log-probs of the teacher's top-k ids, [N, T-1, k] in fp32, aligned with `[:, 1:]` of
    the batch: position t's ids (`topk_ids_NTk[:, t]`, where `topk_mask_NT` is 1) are what the logits at
    t - 1 predict. Computed only at those positions, in fp32 chunks forward and backward (`_ScoredLogps`);
    0 elsewhere, where the top-k losses' masks give them no weight. `dense_topk_token_logps` is the
    whole-tensor formula."""
    mask_NT = topk_mask_NT[:, 1:] > 0
    rows_b, rows_t = mask_NT.nonzero(as_tuple=True)
    ids_Nk = topk_ids_NTk[rows_b, rows_t + 1]
    logps_Nk = _ScoredLogps.apply(logits_NTV, rows_b, rows_t, ids_Nk, chunk_bytes)
    return logps_Nk.new_zeros(*mask_NT.shape, ids_Nk.shape[-1]).index_put((rows_b, rows_t), logps_Nk)


def dense_topk_token_logps(logits_NTV: torch.Tensor, topk_ids_NTk: torch.Tensor) -> torch.Tensor:
    """`topk_token_logps` at every position, over an fp32 copy of [N, T-1, V] (gather - logsumexp): the
    reference it is tested and benchmarked against."""
    logits_NTV = logits_NTV[:, :-1].float()
    return logits_NTV.gather(-1, topk_ids_NTk[:, 1:]) - torch.logsumexp(logits_NTV, -1, keepdim=True)


def length_normalized(logps_B: torch.Tensor, num_tokens_B: torch.Tensor) -> torch.Tensor:
    """Mean token log-prob: log P(y|x) / |y| (an empty response counts as one token)."""
    return logps_B / num_tokens_B.clamp(min=1)


def hinge_loss(chosen_logps_B: torch.Tensor, rejected_logps_B: torch.Tensor, beta: float) -> torch.Tensor:
    """Ranking calibration: mean over pairs of max(0, beta - log P(y+|x) + log P(y-|x))."""
    return torch.clamp(beta - chosen_logps_B + rejected_logps_B, min=0).mean()


ranking_calibration_loss = hinge_loss  # the paper's name for it


def margin_loss(
    chosen_logps_B: torch.Tensor,
    rejected_logps_B: torch.Tensor,
    chosen_scores_B: torch.Tensor,
    rejected_scores_B: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Margin calibration: mean of max(0, beta * (s(y+) - s(y-)) - log P(y+|x) + log P(y-|x)).

    The margin owed grows with the score gap; a pair whose scores tie owes none (the
    loss then only pushes where log P(y-) > log P(y+)), and a pair where y- scores
    higher owes a negative margin.
    """
    margin_B = beta * (chosen_scores_B - rejected_scores_B)
    return torch.clamp(margin_B - chosen_logps_B + rejected_logps_B, min=0).mean()


def logistic_loss(chosen_logps_B: torch.Tensor, rejected_logps_B: torch.Tensor, gamma: float) -> torch.Tensor:
    """Logistic ranking: mean of -log sigmoid(gamma * (log P(y+|x) - log P(y-|x))) (= softplus(-gamma * diff))."""
    return F.softplus(-gamma * (chosen_logps_B - rejected_logps_B)).mean()


def listwise_hinge_loss(
    chosen_logps_B: torch.Tensor,
    rejected_logps_BK: torch.Tensor,
    beta: float,
    rejected_mask_BK: torch.Tensor | None = None,
) -> torch.Tensor:
    """The teacher output above every student sample of its prompt:
    mean over prompts of mean_k max(0, beta - log P(y+|x) + log P(y-_k|x)).

    `rejected_mask_BK` (1 = real sample) lets prompts have fewer than K samples; a prompt
    with none contributes 0. With K = 1 this is `hinge_loss`.
    """
    violation_BK = torch.clamp(beta - chosen_logps_B[:, None] + rejected_logps_BK, min=0)
    if rejected_mask_BK is None:
        return violation_BK.mean()
    mask_BK = rejected_mask_BK.to(violation_BK.dtype)
    return ((violation_BK * mask_BK).sum(-1) / mask_BK.sum(-1).clamp(min=1)).mean()


def nll_loss(chosen_logps_B: torch.Tensor, chosen_num_tokens_B: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of the chosen outputs: -sum log P(y+|x) / sum |y+|."""
    return -chosen_logps_B.sum() / chosen_num_tokens_B.sum().clamp(min=1)


class Sequences(NamedTuple):
    """One side of a batch of pairs: each sequence's summed response log-prob and its scored tokens, [B] (listwise
    rejected sides: [B, K]), and, judged by the teacher (train.scorer=teacher: the margin loss), each one's score;
    for dpo, the frozen reference's summed log-prob of each (`ref_logps`)."""

    logps: torch.Tensor
    num_tokens: torch.Tensor
    scores: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None

    def ranked_logps(self) -> torch.Tensor:
        """What the ranking losses compare: log P(y|x), or with a reference log P(y|x) - log P_ref(y|x)."""
        return self.logps if self.ref_logps is None else self.logps - self.ref_logps


def plad_loss(
    chosen: Sequences,
    rejected: Sequences,
    loss: LossConfig,
    token_kd: torch.Tensor | None = None,
    ranked_B: torch.Tensor | None = None,
    rejected_mask_BK: torch.Tensor | None = None,
    term_scales: tuple[float, float] = (1.0, 1.0),
) -> dict[str, torch.Tensor]:
    """The training objective `loss.type`: a ranking loss (+ loss.nll_weight x NLL of the chosen output).

    The token-level objectives train something else on the same batches: seqkd the NLL of the
    chosen output; token_kd, onpolicy_kd and contrastive a precomputed per-token term passed as
    `token_kd` (`token_kd_loss`, `topk_divergence`, `contrastive_topk_loss`); their ranking loss is
    still computed and reported, not trained.

    `ranked_B` (1 = ranked) leaves pairs out of the ranking part whose sides are the same
    text (no ranking signal; they still count in the NLL part). For `listwise`, the rejected side is
    [B, K] with `rejected_mask_BK` (1 = a real sample).

    `term_scales` (ranking, per-token) multiply the trained terms: a micro-batch's share of its
    optimizer step's ranked pairs and response tokens (`step_term_scales`), so that accumulated
    micro-batches and data-parallel ranks add up to the mean over the whole step.

    Returns `loss` (to backpropagate) and detached statistics: the ranking part, the
    NLL part (per token), the share of (chosen, rejected) pairs ranked right and the mean margin
    (these three unscaled: this micro-batch's own means).
    """
    trained = objective(loss.type)
    if trained.needs_reference and (chosen.ref_logps is None or rejected.ref_logps is None):
        raise ValueError(f"loss type {loss.type!r} needs the reference's log-probs of each side (Sequences.ref_logps)")
    chosen_B, rejected_B = chosen.ranked_logps(), rejected.ranked_logps()
    chosen_scores_B, rejected_scores_B = chosen.scores, rejected.scores
    if loss.length_normalize:
        chosen_B = length_normalized(chosen_B, chosen.num_tokens)
        rejected_B = length_normalized(rejected_B, rejected.num_tokens)
    nll = nll_loss(chosen.logps, chosen.num_tokens)
    if trained.groups_samples or rejected_B.dim() == 2:
        rejected_BK = rejected_B if rejected_B.dim() == 2 else rejected_B[:, None]
        if rejected_mask_BK is None:  # pairs (K = 1), e.g. held-out evaluation: the ranked ones count
            rejected_mask_BK = torch.ones_like(rejected_BK) if ranked_B is None else ranked_B[:, None]
        mask_BK = rejected_mask_BK.to(rejected_BK.dtype)
        rank = listwise_hinge_loss(chosen_B, rejected_BK, loss.beta, mask_BK)
        diff_BK = chosen_B[:, None] - rejected_BK
        pairs = mask_BK.sum().clamp(min=1)
        accuracy, margin = ((diff_BK > 0).to(mask_BK.dtype) * mask_BK).sum() / pairs, (diff_BK * mask_BK).sum() / pairs
    else:
        if ranked_B is not None:  # pairs with a ranking signal only (an empty selection ranks nothing)
            keep = ranked_B > 0
            chosen_B, rejected_B = chosen_B[keep], rejected_B[keep]
            if chosen_scores_B is not None and rejected_scores_B is not None:
                chosen_scores_B, rejected_scores_B = chosen_scores_B[keep], rejected_scores_B[keep]
        rank = _ranking(trained, chosen_B, rejected_B, loss.beta, loss.gamma, chosen_scores_B, rejected_scores_B)
        accuracy, margin = (chosen_B > rejected_B).float().mean(), (chosen_B - rejected_B).mean()
        if chosen_B.numel() == 0:
            rank, accuracy, margin = chosen.logps.sum() * 0, torch.tensor(0.0), torch.tensor(0.0)
    if not trained.trains_ranking:
        rank = rank.detach()  # reported for comparison, not trained
    rank_scale, token_scale = term_scales
    if trained.token_term == NLL:
        total = _scaled(nll, token_scale)
    elif trained.per_token:
        if token_kd is None:
            raise ValueError(
                f"loss type {loss.type!r} needs its per-token term as token_kd (see token_kd_loss, "
                "topk_divergence, contrastive_topk_loss)"
            )
        total = _scaled(token_kd, token_scale)
    else:
        trained_rank = _scaled(rank, rank_scale)
        total = trained_rank + loss.nll_weight * _scaled(nll, token_scale) if loss.nll_weight else trained_rank
    return {
        "loss": total,
        "rank_loss": rank.detach(),
        "nll": nll.detach(),
        "accuracy": accuracy.detach(),
        "margin": margin.detach(),
    }


def _scaled(term: torch.Tensor, scale: float) -> torch.Tensor:
    return term if scale == 1.0 else term * scale


def step_term_scales(
    ranked: float, tokens: float, step_ranked: float, step_tokens: float, micro_batches_per_step: int, world_size: int
) -> tuple[float, float]:
    """`plad_loss`'s term_scales for one micro-batch with `ranked` ranking terms (pairs with a ranking
    signal; listwise: prompts) and `tokens` chosen response tokens, in an optimizer step whose
    micro-batches hold `step_ranked` and `step_tokens` on all ranks together.

    The engine divides each micro-batch's loss by the accumulation steps and averages gradients
    over ranks; a micro-batch's mean times count / step count * accumulation * ranks turns that
    into the step's sum over everything / its count: micro 8 x accumulation 2 trains exactly as
    micro 16, and ranks with more ranked pairs weigh more, as one big batch would.
    """
    factor = micro_batches_per_step * world_size
    return (
        ranked / step_ranked * factor if step_ranked else 0.0,
        tokens / step_tokens * factor if step_tokens else 0.0,
    )


def _ranking(trained: Objective, chosen_B, rejected_B, beta, gamma, chosen_scores_B, rejected_scores_B) -> torch.Tensor:
    """The objective's pairwise ranking loss (the per-token objectives report the hinge)."""
    if trained.needs_scores and (chosen_scores_B is None or rejected_scores_B is None):
        raise ValueError(f"loss type {trained.name!r} needs each side's scores (Sequences.scores)")
    return RANKING_LOSSES[trained.ranking](chosen_B, rejected_B, beta, gamma, chosen_scores_B, rejected_scores_B)


# Each pairwise ranking loss an Objective names, on (chosen, rejected, beta, gamma, chosen scores, rejected scores).
RANKING_LOSSES = {
    "hinge": lambda c, r, beta, gamma, sc, sr: hinge_loss(c, r, beta),
    "logistic": lambda c, r, beta, gamma, sc, sr: logistic_loss(c, r, gamma),
    "margin": lambda c, r, beta, gamma, sc, sr: margin_loss(c, r, sc, sr, beta),
    "dpo": lambda c, r, beta, gamma, sc, sr: logistic_loss(c, r, beta),  # c, r: log-ratios to the reference
}
