"""Per-token distillation terms: the student's token distribution against the teacher's. Pure torch.

    token_kd_loss (shared vocabulary, a local teacher)  mean over y+ tokens of KL(p_teacher || p_student)
    topk_divergence (on-policy KD, the samples)         reverse KL(S || T), forward KL(T || S) or GKD's JSD(beta)
                                                         over the teacher's top-k log-probs plus the tail
    contrastive_topk_loss (DistiLLM-2 style)            SKL_alpha(T || S) on y+  +  SRKL_alpha(S || T) on y-
    teacher_scores (for losses.margin_loss)             s(y) = the teacher's mean log-prob per token of y

`plad_loss` (plad_ray.losses) trains one of them in place of the ranking loss for the per-token objectives
(plad_ray.objectives). `token_kd_loss` reads [B, T, V] logits in fp32 chunks of the scored positions, forward and
backward, as `losses.sequence_logps` does; `dense_token_kd_loss` is its one-expression reference.
"""

import math

import torch
import torch.nn.functional as F

from plad_ray.losses import LOGPS_CHUNK_BYTES, _chunk_rows


def token_kd_loss(
    student_logits_BTV: torch.Tensor,
    teacher_logits_BTV: torch.Tensor,
    response_mask_BT: torch.Tensor,
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
        raise ValueError(
            f"token_kd needs logits of one shape: student {tuple(student_logits_BTV.shape)}, "
            f"teacher {tuple(teacher_logits_BTV.shape)}"
        )
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
    tail_BT = torch.where(
        top_BT > -0.6931, torch.log((-torch.expm1(near_one_BT)).clamp(min=1e-12)), torch.log1p(-far_BT.exp())
    )
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


def topk_divergence(
    student_BTk: torch.Tensor,
    teacher_BTk: torch.Tensor,
    mask_BT: torch.Tensor,
    kind: str = "reverse_kl",
    beta: float = 0.5,
) -> torch.Tensor:
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


def contrastive_topk_loss(
    student_chosen_BTk: torch.Tensor,
    teacher_chosen_BTk: torch.Tensor,
    chosen_mask_BT,
    student_rejected_BTk: torch.Tensor,
    teacher_rejected_BTk: torch.Tensor,
    rejected_mask_BT,
    alpha: float = 0.1,
) -> torch.Tensor:
    """A DistiLLM-2-style contrastive objective on a (teacher output, student sample) pair: on the teacher's
    output the skew forward KL, SKL_alpha(T || S), pulls the student up where the teacher is likely; on the
    student's sample the skew reverse KL, SRKL_alpha(S || T), pushes it down where the teacher is not. Each
    term is a mean over its sequence's response tokens; the two are added."""
    s_c, t_c = topk_buckets(student_chosen_BTk), topk_buckets(teacher_chosen_BTk).detach()
    s_r, t_r = topk_buckets(student_rejected_BTk), topk_buckets(teacher_rejected_BTk).detach()
    return _masked_mean(skew_kl(t_c, s_c, alpha), chosen_mask_BT) + _masked_mean(
        skew_kl(s_r, t_r, alpha), rejected_mask_BT
    )


def teacher_scores(teacher_token_logps_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """s(y) for margin calibration judged by the teacher: its mean log-prob per response token of y (the log-prob
    of the token that is there, from the same prefill). `margin_loss(..., teacher_scores(chosen),
    teacher_scores(rejected), beta)` is PLaD's margin loss with no verifier."""
    mask_BT = mask_BT.to(teacher_token_logps_BT.dtype)
    return ((teacher_token_logps_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1)).detach()
