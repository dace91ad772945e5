"""Sequence log-probabilities and the PLaD loss family. Pure torch: no ray, deepspeed or vllm.

PLaD (Zhang et al., 2024) trains the student to rank the teacher's output y+ above its
own sample y- under its own sequence likelihood, log P(y|x) = sum_t log p(y_t | x, y_<t)
over response tokens only. Every loss below takes per-sequence log-probs of shape [B]
(B pairs; [B, K] for K student samples per prompt) and returns the mean over pairs:

    hinge (ranking calibration, PLaD eq. 3)   max(0, beta - log P(y+|x) + log P(y-|x))
    margin calibration, score s               max(0, beta*(s(y+) - s(y-)) - log P(y+|x) + log P(y-|x))
    logistic                                  -log sigmoid(gamma * (log P(y+|x) - log P(y-|x)))
    listwise (y+ above each of K samples)     mean_k max(0, beta - log P(y+|x) + log P(y-_k|x))
    NLL regulariser (per token, SLiC-HF)      lambda * -log P(y+|x) / |y+|
    seqkd (baseline, SFT on teacher outputs)  -log P(y+|x) / |y+|     (y- is scored, not trained on)
    token_kd (baseline, shared vocabulary)    mean over y+ tokens of KL(p_teacher(.|x, y+_<t) || p_student(.|x, y+_<t))

On the teacher's top-k log-probs of a sequence (k ids per position, plus the tail), per response token:

    topk_divergence (on-policy KD)            reverse KL(S || T), forward KL(T || S) or GKD's JSD(beta)
    contrastive_topk_loss (DistiLLM-2 style)  SKL_alpha(T || S) on y+  +  SRKL_alpha(S || T) on y-
    teacher_scores (for margin_loss)          s(y) = the teacher's mean log-prob per token of y

Length normalisation (mean instead of summed token log-prob) is applied to the inputs
by `length_normalized`, so it composes with every loss; beta is then a margin per token
(SimPO-style), not per sequence. `plad_loss` is the training objective the workers call.
Tensor names carry their shape: B pairs, K samples, T positions, V vocabulary.

What reads a [B, T, V] tensor of logits (`sequence_logps`, `topk_token_logps`, `token_kd_loss`) computes
only the scored positions, in fp32 chunks forward and backward, with no fp32 copy of the whole tensor
(152k rows x 1,024 tokens x 16 sequences is 10 GB of fp32); the `dense_*` functions are the one-expression
references they are tested and benchmarked against.

Why the NLL term is on by default (`train.loss.nll_weight`): a ranking loss alone can
win the ranking by lowering the likelihood of both outputs ("likelihood displacement",
Razin et al. 2024); on our benchmark the hinge alone made the teacher's outputs less
likely and the student worse. SLiC-HF's cross-entropy regulariser and CPO's behaviour-
cloning term (TRL cpo_alpha = 1) are the same remedy.
"""

import math

import torch
import torch.nn.functional as F

from plad_ray.objectives import NLL, Objective, objective


LOGPS_CHUNK_BYTES = 1 << 28  # fp32 working set per chunk of scored positions (256 MiB)


def sequence_logps(
    logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor, response_mask_BT: torch.Tensor,
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


def topk_token_logps(logits_NTV: torch.Tensor, topk_ids_NTk: torch.Tensor, topk_mask_NT: torch.Tensor,
                     chunk_bytes: int = LOGPS_CHUNK_BYTES) -> torch.Tensor:
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
    chosen_logps_B: torch.Tensor, rejected_logps_B: torch.Tensor,
    chosen_scores_B: torch.Tensor, rejected_scores_B: torch.Tensor, beta: float,
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
    chosen_logps_B: torch.Tensor, rejected_logps_BK: torch.Tensor, beta: float,
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


def token_kd_loss(
    student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor, response_mask_BT: torch.Tensor,
    chunk_bytes: int = LOGPS_CHUNK_BYTES,
) -> torch.Tensor:
    """Token-level KD (forward KL), per response token:
    sum_{b,t} KL(p_T(.|y_<t) || p_S(.|y_<t)) * mask / sum mask, with KL = sum_v p_T (log p_T - log p_S).

    Both models score the same token ids, so it needs a shared vocabulary. Position t's
    logits predict token t+1, as in `sequence_logps`; the teacher's logits carry no gradient.
    Only the scored positions are computed, in fp32 chunks forward and backward (`_ScoredForwardKL`);
    `dense_token_kd_loss` is the same formula over the whole tensors.
    """
    if student_logits_BTV.shape != teacher_logits_BTV.shape:
        raise ValueError(f"token_kd needs logits of one shape: student {tuple(student_logits_BTV.shape)}, "
                         f"teacher {tuple(teacher_logits_BTV.shape)}")
    mask_BT = response_mask_BT[:, 1:]
    rows_b, rows_t = (mask_BT > 0).nonzero(as_tuple=True)
    kl_N = _ScoredForwardKL.apply(student_logits_BTV, teacher_logits_BTV.detach(), rows_b, rows_t, chunk_bytes)
    weights_N = mask_BT[rows_b, rows_t].to(kl_N.dtype)
    return (kl_N * weights_N).sum() / mask_BT.to(kl_N.dtype).sum().clamp(min=1)


class _ScoredForwardKL(torch.autograd.Function):
    """KL(p_T || p_S) at the scored positions (rows_b, rows_t), in fp32, a chunk of positions at a time.
    Saves both logits (no copy, each in its own dtype) and both log-normalisers per scored position;
    backward writes (softmax_S - p_T) * g chunk by chunk into the student logits' gradient (the teacher's
    gets none). Written by hand for the reason `_ScoredLogps` is."""

    @staticmethod
    def forward(ctx, student_BTV, teacher_BTV, rows_b, rows_t, chunk_bytes):
        n, vocab = rows_b.shape[0], student_BTV.shape[-1]
        chunk = _chunk_rows(chunk_bytes, vocab, blocks=2)
        kl_N = torch.empty(n, dtype=torch.float32, device=student_BTV.device)
        lse_s_N, lse_t_N = torch.empty_like(kl_N), torch.empty_like(kl_N)
        for start in range(0, n, chunk):
            span = slice(start, start + chunk)
            s_CV = student_BTV[rows_b[span], rows_t[span]].float()
            t_CV = teacher_BTV[rows_b[span], rows_t[span]].float()
            lse_s_N[span], lse_t_N[span] = torch.logsumexp(s_CV, -1), torch.logsumexp(t_CV, -1)
            s_CV.sub_(lse_s_N[span, None])  # log p_S
            t_CV.sub_(lse_t_N[span, None])  # log p_T
            diff_CV = t_CV - s_CV
            kl_N[span] = diff_CV.mul_(t_CV.exp_()).sum(-1)
        ctx.save_for_backward(student_BTV, teacher_BTV, rows_b, rows_t, lse_s_N, lse_t_N)
        ctx.chunk = chunk
        return kl_N

    @staticmethod
    def backward(ctx, grad_N):
        student_BTV, teacher_BTV, rows_b, rows_t, lse_s_N, lse_t_N = ctx.saved_tensors
        grad_BTV = torch.zeros_like(student_BTV)
        for start in range(0, rows_b.shape[0], ctx.chunk):
            span = slice(start, start + ctx.chunk)
            s_CV = student_BTV[rows_b[span], rows_t[span]].float().sub_(lse_s_N[span, None]).exp_()
            t_CV = teacher_BTV[rows_b[span], rows_t[span]].float().sub_(lse_t_N[span, None]).exp_()
            s_CV.sub_(t_CV).mul_(grad_N[span, None].float())  # (softmax_S - p_T) * g
            grad_BTV[rows_b[span], rows_t[span]] = s_CV.to(grad_BTV.dtype)
        return grad_BTV, None, None, None, None


def dense_token_kd_loss(
    student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor, response_mask_BT: torch.Tensor
) -> torch.Tensor:
    """`token_kd_loss` over fp32 log-softmaxes of both whole tensors: the reference it is tested and
    benchmarked against."""
    student_BTV = F.log_softmax(student_logits_BTV[:, :-1].float(), -1)
    teacher_BTV = F.log_softmax(teacher_logits_BTV[:, :-1].float().detach(), -1)
    kl_BT = (teacher_BTV.exp() * (teacher_BTV - student_BTV)).sum(-1)
    mask_BT = response_mask_BT[:, 1:].to(kl_BT.dtype)
    return (kl_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1)


# --- Losses on the teacher's top-k log-probs (issue 18: the teacher scores the student's samples) -------------
# The teacher's view of a sequence is, per position, its log-probs of its k likeliest next tokens (ids_BTk,
# teacher_BTk), as vLLM returns them from a prefill. Both distributions are compared on k + 1 buckets: those k
# ids and "every other token" (the tail, 1 - the top-k mass). Merging tokens into buckets never increases a KL
# or a JSD (the data-processing inequality), so each divergence below is a lower bound of the full-vocabulary
# one and equals it when the top-k holds all of the teacher's and student's mass. student_BTk are the
# student's log-probs of the same ids (`torch.gather` of its log-softmax); only they carry a gradient.


def topk_buckets(logps_BTk: torch.Tensor) -> torch.Tensor:
    """[B, T, k+1] log-probs: the k given ones and the log of the remaining mass, log(1 - sum exp)."""
    logps_BTk = logps_BTk.float()
    top_BT = torch.logsumexp(logps_BTk, -1).clamp(max=0.0)
    # log(1 - e^x) for x <= 0, stable at both ends (each branch gets only the inputs it is used for, so
    # neither sends a nan gradient through the other); the floor keeps it finite when the top-k is all.
    near_one_BT, far_BT = top_BT.clamp(min=-0.6931), top_BT.clamp(max=-0.6931)
    tail_BT = torch.where(top_BT > -0.6931, torch.log((-torch.expm1(near_one_BT)).clamp(min=1e-12)),
                          torch.log1p(-far_BT.exp()))
    return torch.cat([logps_BTk, tail_BT[..., None]], -1)


def _kl(p_BTn: torch.Tensor, q_BTn: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position over the last axis, from log-probs."""
    return (p_BTn.exp() * (p_BTn - q_BTn)).sum(-1)


def _mixture(p_BTn: torch.Tensor, q_BTn: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight * p + (1 - weight) * q), from log-probs; 0 < weight < 1."""
    return torch.logaddexp(p_BTn + math.log(weight), q_BTn + math.log(1.0 - weight))


def _masked_mean(value_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    mask_BT = mask_BT.to(value_BT.dtype)
    return (value_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1)


def topk_divergence(student_BTk: torch.Tensor, teacher_BTk: torch.Tensor, mask_BT: torch.Tensor,
                    kind: str = "reverse_kl", beta: float = 0.5) -> torch.Tensor:
    """On-policy KD on the student's own samples, per response token (mask_BT = 1), over the teacher's top-k
    plus the tail: `reverse_kl` KL(S || T) (MiniLLM, GKD with beta = 1), `forward_kl` KL(T || S), or `jsd`,
    the generalised Jensen-Shannon divergence of GKD: beta * KL(T || M) + (1 - beta) * KL(S || M) with
    M = beta * T + (1 - beta) * S (0 < beta < 1)."""
    s_BTn, t_BTn = topk_buckets(student_BTk), topk_buckets(teacher_BTk).detach()
    if kind == "reverse_kl":
        div_BT = _kl(s_BTn, t_BTn)
    elif kind == "forward_kl":
        div_BT = _kl(t_BTn, s_BTn)
    elif kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
        m_BTn = _mixture(t_BTn, s_BTn, beta)
        div_BT = beta * _kl(t_BTn, m_BTn) + (1 - beta) * _kl(s_BTn, m_BTn)
    else:
        raise ValueError(f"kind {kind!r}: expected reverse_kl, forward_kl or jsd")
    return _masked_mean(div_BT, mask_BT)


def skew_kl(p_BTn: torch.Tensor, q_BTn: torch.Tensor, alpha: float) -> torch.Tensor:
    """Skew KL per position: KL(p || alpha * p + (1 - alpha) * q) (DistiLLM); alpha = 0 is KL(p || q)."""
    return _kl(p_BTn, _mixture(p_BTn, q_BTn, alpha) if alpha > 0 else q_BTn)


def contrastive_topk_loss(student_chosen_BTk: torch.Tensor, teacher_chosen_BTk: torch.Tensor, chosen_mask_BT,
                          student_rejected_BTk: torch.Tensor, teacher_rejected_BTk: torch.Tensor, rejected_mask_BT,
                          alpha: float = 0.1) -> torch.Tensor:
    """A DistiLLM-2-style contrastive objective on a (teacher output, student sample) pair: on the teacher's
    output the skew forward KL, SKL_alpha(T || S), pulls the student up where the teacher is likely; on the
    student's sample the skew reverse KL, SRKL_alpha(S || T), pushes it down where the teacher is not. Each
    term is a mean over its sequence's response tokens; the two are added."""
    s_c, t_c = topk_buckets(student_chosen_BTk), topk_buckets(teacher_chosen_BTk).detach()
    s_r, t_r = topk_buckets(student_rejected_BTk), topk_buckets(teacher_rejected_BTk).detach()
    return (_masked_mean(skew_kl(t_c, s_c, alpha), chosen_mask_BT)
            + _masked_mean(skew_kl(s_r, t_r, alpha), rejected_mask_BT))


def teacher_scores(teacher_token_logps_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """s(y) for margin calibration judged by the teacher: its mean log-prob per response token of y (the log-prob
    of the token that is there, from the same prefill). `margin_loss(..., teacher_scores(chosen),
    teacher_scores(rejected), beta)` is PLaD's margin loss with no verifier."""
    mask_BT = mask_BT.to(teacher_token_logps_BT.dtype)
    return ((teacher_token_logps_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1)).detach()


def plad_loss(
    chosen_logps_B: torch.Tensor,
    chosen_num_tokens_B: torch.Tensor,
    rejected_logps_B: torch.Tensor,
    rejected_num_tokens_B: torch.Tensor,
    beta: float,
    length_normalize: bool = False,
    nll_weight: float = 0.0,
    loss_type: str = "hinge",
    gamma: float = 1.0,
    chosen_scores_B: torch.Tensor | None = None,
    rejected_scores_B: torch.Tensor | None = None,
    token_kd: torch.Tensor | None = None,
    ranked_B: torch.Tensor | None = None,
    rejected_mask_BK: torch.Tensor | None = None,
    term_scales: tuple[float, float] = (1.0, 1.0),
) -> dict[str, torch.Tensor]:
    """The training objective: a ranking loss of `loss_type` (+ lambda * NLL of the chosen output).

    The token-level objectives train something else on the same batches: seqkd the NLL of the
    chosen output; token_kd, onpolicy_kd and contrastive a precomputed per-token term passed as
    `token_kd` (`token_kd_loss`, `topk_divergence`, `contrastive_topk_loss`); their ranking loss is
    still computed and reported, not trained.

    `ranked_B` (1 = ranked) leaves pairs out of the ranking part whose sides are the same
    text (no ranking signal; they still count in the NLL part). For `listwise`, rejected
    log-probs and token counts are [B, K] with `rejected_mask_BK` (1 = a real sample).

    `term_scales` (ranking, per-token) multiply the trained terms: a micro-batch's share of its
    optimizer step's ranked pairs and response tokens (`step_term_scales`), so that accumulated
    micro-batches and data-parallel ranks add up to the mean over the whole step.

    Returns `loss` (to backpropagate) and detached statistics: the ranking part, the
    NLL part (per token), the share of (chosen, rejected) pairs ranked right and the mean margin
    (these three unscaled: this micro-batch's own means).
    """
    trained = objective(loss_type)
    chosen_B, rejected_B = chosen_logps_B, rejected_logps_B
    if length_normalize:
        chosen_B = length_normalized(chosen_logps_B, chosen_num_tokens_B)
        rejected_B = length_normalized(rejected_logps_B, rejected_num_tokens_B)
    nll = nll_loss(chosen_logps_B, chosen_num_tokens_B)
    if trained.groups_samples or rejected_B.dim() == 2:
        rejected_BK = rejected_B if rejected_B.dim() == 2 else rejected_B[:, None]
        if rejected_mask_BK is None:  # pairs (K = 1), e.g. held-out evaluation: the ranked ones count
            rejected_mask_BK = torch.ones_like(rejected_BK) if ranked_B is None else ranked_B[:, None]
        mask_BK = rejected_mask_BK.to(rejected_BK.dtype)
        rank = listwise_hinge_loss(chosen_B, rejected_BK, beta, mask_BK)
        diff_BK = chosen_B[:, None] - rejected_BK
        pairs = mask_BK.sum().clamp(min=1)
        accuracy, margin = ((diff_BK > 0).to(mask_BK.dtype) * mask_BK).sum() / pairs, (diff_BK * mask_BK).sum() / pairs
    else:
        if ranked_B is not None:  # pairs with a ranking signal only (an empty selection ranks nothing)
            keep = ranked_B > 0
            chosen_B, rejected_B = chosen_B[keep], rejected_B[keep]
            if chosen_scores_B is not None and rejected_scores_B is not None:
                chosen_scores_B, rejected_scores_B = chosen_scores_B[keep], rejected_scores_B[keep]
        rank = _ranking(trained, chosen_B, rejected_B, beta, gamma, chosen_scores_B, rejected_scores_B)
        accuracy, margin = (chosen_B > rejected_B).float().mean(), (chosen_B - rejected_B).mean()
        if chosen_B.numel() == 0:
            rank, accuracy, margin = chosen_logps_B.sum() * 0, torch.tensor(0.0), torch.tensor(0.0)
    if not trained.trains_ranking:
        rank = rank.detach()  # reported for comparison, not trained
    rank_scale, token_scale = term_scales
    if trained.token_term == NLL:
        loss = _scaled(nll, token_scale)
    elif trained.per_token:
        if token_kd is None:
            raise ValueError(f"loss_type {loss_type!r} needs its per-token term as token_kd (see token_kd_loss, "
                             "topk_divergence, contrastive_topk_loss)")
        loss = _scaled(token_kd, token_scale)
    else:
        trained_rank = _scaled(rank, rank_scale)
        loss = trained_rank + nll_weight * _scaled(nll, token_scale) if nll_weight else trained_rank
    return {
        "loss": loss,
        "rank_loss": rank.detach(),
        "nll": nll.detach(),
        "accuracy": accuracy.detach(),
        "margin": margin.detach(),
    }


def _scaled(term: torch.Tensor, scale: float) -> torch.Tensor:
    return term if scale == 1.0 else term * scale


def step_term_scales(ranked: float, tokens: float, step_ranked: float, step_tokens: float,
                     micro_batches_per_step: int, world_size: int) -> tuple[float, float]:
    """`plad_loss`'s term_scales for one micro-batch with `ranked` ranking terms (pairs with a ranking
    signal; listwise: prompts) and `tokens` chosen response tokens, in an optimizer step whose
    micro-batches hold `step_ranked` and `step_tokens` on all ranks together.

    The engine divides each micro-batch's loss by the accumulation steps and averages gradients
    over ranks; a micro-batch's mean times count / step count * accumulation * ranks turns that
    into the step's sum over everything / its count: micro 8 x accumulation 2 trains exactly as
    micro 16, and ranks with more ranked pairs weigh more, as one big batch would.
    """
    factor = micro_batches_per_step * world_size
    return (ranked / step_ranked * factor if step_ranked else 0.0,
            tokens / step_tokens * factor if step_tokens else 0.0)


def _ranking(trained: Objective, chosen_B, rejected_B, beta, gamma, chosen_scores_B, rejected_scores_B) -> torch.Tensor:
    """The objective's pairwise ranking loss (the per-token objectives report the hinge)."""
    if trained.needs_scores and (chosen_scores_B is None or rejected_scores_B is None):
        raise ValueError(f"loss_type {trained.name!r} needs chosen_scores_B and rejected_scores_B")
    return RANKING_LOSSES[trained.ranking](chosen_B, rejected_B, beta, gamma, chosen_scores_B, rejected_scores_B)


# Each pairwise ranking loss an Objective names, on (chosen, rejected, beta, gamma, chosen scores, rejected scores).
RANKING_LOSSES = {
    "hinge": lambda c, r, beta, gamma, sc, sr: hinge_loss(c, r, beta),
    "logistic": lambda c, r, beta, gamma, sc, sr: logistic_loss(c, r, gamma),
    "margin": lambda c, r, beta, gamma, sc, sr: margin_loss(c, r, sc, sr, beta),
}

