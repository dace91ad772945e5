"""Sequence log-probabilities and the PLaD ranking calibration loss. Pure torch.

PLaD (Zhang et al., 2024) trains the student to rank the teacher's output y_T above its
own sample y_S under its own sequence likelihood:

    L_rank = max(0, beta - log P(y_T|x) + log P(y_S|x))                      (PLaD eq. 3)

where log P(y|x) = sum_t log p(y_t | x, y_<t) over response tokens only. Optional:
length-normalised log P (mean over response tokens instead of the sum) and a
lambda * NLL(y_T|x) regulariser (per-token cross-entropy on the teacher output, as in
SLiC-HF). Tensor names carry their shape: B pairs, T positions, V vocabulary.
"""

import torch


def sequence_logps(
    logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor, response_mask_BT: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's response tokens, and how many there are.

    `response_mask_BT` is 1 on the tokens whose probability counts (the response,
    including its EOS when the output stopped), 0 on prompt and padding. Position t's
    logits predict token t+1, so the first token of a sequence is never scored.
    Uses gather - logsumexp, which never materialises a [B, T, V] log-softmax.
    """
    logits = logits_BTV[:, :-1].float()
    targets_BT = input_ids_BT[:, 1:]
    mask_BT = response_mask_BT[:, 1:].to(logits.dtype)
    token_logps_BT = torch.gather(logits, 2, targets_BT.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    return (token_logps_BT * mask_BT).sum(-1), mask_BT.sum(-1)


def ranking_calibration_loss(
    chosen_logps_B: torch.Tensor, rejected_logps_B: torch.Tensor, beta: float
) -> torch.Tensor:
    """Mean over pairs of max(0, beta - log P(y_T|x) + log P(y_S|x)) (PLaD eq. 3)."""
    return torch.clamp(beta - chosen_logps_B + rejected_logps_B, min=0).mean()


def plad_loss(
    chosen_logps_B: torch.Tensor,
    chosen_num_tokens_B: torch.Tensor,
    rejected_logps_B: torch.Tensor,
    rejected_num_tokens_B: torch.Tensor,
    beta: float,
    length_normalize: bool = False,
    nll_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The training objective: ranking loss (+ lambda * NLL of the chosen output).

    Returns `loss` (to backpropagate) and detached statistics: the ranking part, the
    NLL part (per token), the share of pairs ranked right and the mean margin.
    """
    chosen_B, rejected_B = chosen_logps_B, rejected_logps_B
    if length_normalize:
        chosen_B = chosen_logps_B / chosen_num_tokens_B.clamp(min=1)
        rejected_B = rejected_logps_B / rejected_num_tokens_B.clamp(min=1)
    rank = ranking_calibration_loss(chosen_B, rejected_B, beta)
    nll = -chosen_logps_B.sum() / chosen_num_tokens_B.sum().clamp(min=1)
    loss = rank + nll_weight * nll if nll_weight else rank
    return {
        "loss": loss,
        "rank_loss": rank.detach(),
        "nll": nll.detach(),
        "accuracy": (chosen_B > rejected_B).float().mean().detach(),
        "margin": (chosen_B - rejected_B).mean().detach(),
    }
