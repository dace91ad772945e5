"""Pure tests of plad_ray.losses: every expected value is derived by hand in a comment."""

import math

import pytest
import torch

from plad_ray.config import LossConfig
from plad_ray.losses import (
    Sequences,
    dense_sequence_logps,
    hinge_loss,
    length_normalized,
    listwise_hinge_loss,
    logistic_loss,
    margin_loss,
    nll_loss,
    plad_loss,
    ranking_calibration_loss,
    sequence_logps,
)


def objective(type: str = "hinge", beta: float = 1.0, nll_weight: float = 0.0, **rest) -> LossConfig:
    """train.loss for these tests: plad_loss's hand values below take the NLL weight 0 unless they say."""
    return LossConfig(type=type, beta=beta, nll_weight=nll_weight, **rest)


def pair(chosen, chosen_tokens, rejected, rejected_tokens, scores=(None, None)) -> tuple[Sequences, Sequences]:
    return Sequences(chosen, chosen_tokens, scores[0]), Sequences(rejected, rejected_tokens, scores[1])


def test_ranking_loss_hand_values():
    # beta=1: pair 1: max(0, 1 - (-2) + (-5)) = max(0, -2) = 0
    #         pair 2: max(0, 1 - (-4) + (-3)) = max(0, 2)  = 2
    #         pair 3: max(0, 1 - (-3) + (-3)) = max(0, 1)  = 1   (tie: the margin is still owed)
    # mean = (0 + 2 + 1) / 3 = 1
    chosen = torch.tensor([-2.0, -4.0, -3.0])
    rejected = torch.tensor([-5.0, -3.0, -3.0])
    assert ranking_calibration_loss(chosen, rejected, beta=1.0).item() == 1.0


def test_ranking_loss_gradient_only_on_violating_pairs():
    # d/dchosen of max(0, b - c + r) is -1 where b - c + r > 0, else 0; divided by B=2 for the mean.
    chosen = torch.tensor([-2.0, -4.0], requires_grad=True)
    rejected = torch.tensor([-5.0, -3.0], requires_grad=True)
    ranking_calibration_loss(chosen, rejected, beta=1.0).backward()
    assert chosen.grad.tolist() == [0.0, -0.5]
    assert rejected.grad.tolist() == [0.0, 0.5]


def test_sequence_logps_masks_prompt_and_padding():
    # Vocabulary of 2; logits [0, ln 3] everywhere give p(token 0) = 1/4, p(token 1) = 3/4.
    # Sequence [p, r1, r2, pad] with response mask [0, 1, 1, 0]: positions 1 and 2 are scored,
    # predicted from positions 0 and 1. Tokens r1=1, r2=0 -> log(3/4) + log(1/4).
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(1, 4, 2).clone()
    input_ids = torch.tensor([[1, 1, 0, 1]])
    response_mask = torch.tensor([[0, 1, 1, 0]])
    logps, num_tokens = sequence_logps(logits, input_ids, response_mask)
    assert num_tokens.tolist() == [2.0]
    assert math.isclose(logps.item(), math.log(0.75) + math.log(0.25), rel_tol=1e-6)


def test_sequence_logps_matches_log_softmax_loop():
    # Reference: a plain loop over positions with log_softmax.
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    input_ids = torch.randint(0, 11, (3, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]])
    logps, num_tokens = sequence_logps(logits, input_ids, mask)
    for b in range(3):
        expected = sum(
            torch.log_softmax(logits[b, t - 1], -1)[input_ids[b, t]].item() for t in range(1, 6) if mask[b, t]
        )
        assert math.isclose(logps[b].item(), expected, rel_tol=1e-5)
        assert num_tokens[b].item() == mask[b, 1:].sum().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
def test_chunked_sequence_logps_equals_the_dense_formula_in_value_and_gradient(dtype, chunk_rows):
    # The memory-bounded function (chunks of chunk_rows scored positions) against the whole-tensor
    # gather - logsumexp: values and logits gradients within 1e-5, including a row with nothing
    # scored (its gradient must be exactly zero) and an upstream gradient that differs per row.
    torch.manual_seed(0)
    vocab = 37
    logits = (torch.randn(4, 9, vocab) * 3).to(dtype)
    input_ids = torch.randint(0, vocab, (4, 9))
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 1, 0, 0, 0],
            [0, 1, 1, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 1, 1, 1, 0],
        ]
    )
    weights = torch.tensor([1.0, -2.0, 3.0, 0.5])
    results = []
    for fn in (lambda *a: sequence_logps(*a, chunk_bytes=4 * vocab * chunk_rows), dense_sequence_logps):
        leaf = logits.clone().requires_grad_(True)
        logps, num_tokens = fn(leaf, input_ids, mask)
        (logps * weights).sum().backward()
        results.append((logps.detach(), num_tokens, leaf.grad))
    (chunked, n_chunked, grad_chunked), (dense, n_dense, grad_dense) = results
    assert chunked.dtype == dense.dtype == torch.float32 and grad_chunked.dtype == dtype
    assert torch.equal(n_chunked, n_dense) and n_chunked.tolist() == [4.0, 8.0, 0.0, 3.0]
    assert torch.allclose(chunked, dense, rtol=1e-5, atol=1e-5)
    assert torch.allclose(grad_chunked.float(), grad_dense.float(), rtol=1e-5, atol=1e-5)
    assert grad_chunked[2].abs().sum() == 0 and grad_chunked[:, -1].abs().sum() == 0  # nothing scored there
    assert grad_chunked.abs().sum() > 0


def test_chunked_sequence_logps_with_nothing_scored_is_zero_with_zero_gradient():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    logps, num_tokens = sequence_logps(logits, torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5))
    logps.sum().backward()
    assert logps.tolist() == [0.0, 0.0] and num_tokens.tolist() == [0.0, 0.0]
    assert logits.grad.abs().sum() == 0


def test_plad_loss_length_normalised_and_nll():
    # chosen: sum -6 over 3 tokens (mean -2); rejected: sum -4 over 1 token (mean -4).
    # Summed: max(0, 1 + 6 - 4) = 3, and the pair is ranked wrong (-6 < -4).
    # Length-normalised: max(0, 1 + 2 - 4) = 0, ranked right (-2 > -4).
    # NLL per chosen token = 6 / 3 = 2; with lambda = 0.5 the loss adds 1.
    args = (torch.tensor([-6.0]), torch.tensor([3.0]), torch.tensor([-4.0]), torch.tensor([1.0]))
    summed = plad_loss(*pair(*args), objective())
    assert summed["loss"].item() == 3.0 and summed["accuracy"].item() == 0.0
    normalised = plad_loss(*pair(*args), objective(length_normalize=True, nll_weight=0.5))
    assert normalised["rank_loss"].item() == 0.0 and normalised["accuracy"].item() == 1.0
    assert normalised["nll"].item() == 2.0
    assert normalised["loss"].item() == 1.0
    assert normalised["margin"].item() == 2.0


def test_margin_loss_hand_values():
    # beta=2, scores (1, 0), (1, 1), (0, 1):
    #   pair 1: margin 2*(1-0) = 2:  max(0, 2 - (-3) + (-4)) = max(0, 1)  = 1
    #   pair 2: margin 2*(1-1) = 0:  max(0, 0 - (-3) + (-4)) = max(0, -1) = 0
    #   pair 3: margin 2*(0-1) = -2: max(0, -2 - (-5) + (-2)) = max(0, 1) = 1
    # mean = 2/3
    chosen = torch.tensor([-3.0, -3.0, -5.0])
    rejected = torch.tensor([-4.0, -4.0, -2.0])
    loss = margin_loss(chosen, rejected, torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0]), beta=2.0)
    assert math.isclose(loss.item(), 2 / 3, rel_tol=1e-6)


def test_margin_loss_with_unit_score_gap_is_the_hinge():
    # s(y+) - s(y-) = 1 everywhere: beta * 1 is the hinge margin.
    chosen, rejected = torch.tensor([-2.0, -4.0, -3.0]), torch.tensor([-5.0, -3.0, -3.0])
    ones, zeros = torch.ones(3), torch.zeros(3)
    assert margin_loss(chosen, rejected, ones, zeros, beta=1.0).item() == hinge_loss(chosen, rejected, 1.0).item()


def test_logistic_loss_hand_values():
    # diff = log P(y+) - log P(y-): pair 1: -2 - (-2) = 0 -> -log sigmoid(0) = log 2
    #                               pair 2: -1 - (-3) = 2, gamma 0.5 -> -log sigmoid(1) = log(1 + e^-1)
    # mean = (log 2 + log(1 + e^-1)) / 2
    loss = logistic_loss(torch.tensor([-2.0, -1.0]), torch.tensor([-2.0, -3.0]), gamma=0.5)
    assert math.isclose(loss.item(), (math.log(2) + math.log(1 + math.exp(-1))) / 2, rel_tol=1e-6)


def test_logistic_loss_gradient():
    # d/dc of softplus(-g*(c - r)) = -g * sigmoid(-g*(c - r)); at c = r that is -g/2, over B=1.
    chosen = torch.tensor([-2.0], requires_grad=True)
    logistic_loss(chosen, torch.tensor([-2.0]), gamma=3.0).backward()
    assert math.isclose(chosen.grad.item(), -1.5, rel_tol=1e-6)


def test_listwise_hinge_hand_values_and_mask():
    # beta=1; prompt 1: chosen -2, samples (-5, -1.5): max(0, 1+2-5)=0, max(0, 1+2-1.5)=1.5 -> mean 0.75
    #         prompt 2: chosen -3, samples (-3, pad):  max(0, 1+3-3)=1 (the pad is masked) -> mean 1
    # mean over prompts = (0.75 + 1) / 2 = 0.875
    chosen = torch.tensor([-2.0, -3.0])
    rejected = torch.tensor([[-5.0, -1.5], [-3.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert listwise_hinge_loss(chosen, rejected, beta=1.0, rejected_mask_BK=mask).item() == 0.875
    # K = 1 is the pairwise hinge.
    c, r = torch.tensor([-2.0, -4.0, -3.0]), torch.tensor([-5.0, -3.0, -3.0])
    assert listwise_hinge_loss(c, r[:, None], beta=1.0).item() == hinge_loss(c, r, 1.0).item()


def test_length_normalized_and_nll():
    # (-6 / 3, -4 / 1, 0 / max(0, 1)) and NLL = (6 + 4) / (3 + 1) = 2.5
    logps, n = torch.tensor([-6.0, -4.0, 0.0]), torch.tensor([3.0, 1.0, 0.0])
    assert length_normalized(logps, n).tolist() == [-2.0, -4.0, 0.0]
    assert nll_loss(logps[:2], n[:2]).item() == 2.5


def test_plad_loss_types():
    # chosen -6 (3 tokens), rejected -4 (1 token). logistic, gamma 1: softplus(-(-6 + 4)) = log(1 + e^2).
    # seqkd trains only the NLL of the chosen output: 6 / 3 = 2, the hinge (3) is reported, not trained.
    args = (
        torch.tensor([-6.0], requires_grad=True),
        torch.tensor([3.0]),
        torch.tensor([-4.0], requires_grad=True),
        torch.tensor([1.0]),
    )
    logistic = plad_loss(*pair(*args), objective("logistic", gamma=1.0))
    assert math.isclose(logistic["loss"].item(), math.log(1 + math.exp(2)), rel_tol=1e-6)
    seqkd = plad_loss(*pair(*args), objective("seqkd"))
    assert seqkd["loss"].item() == 2.0 and seqkd["rank_loss"].item() == 3.0
    seqkd["loss"].backward()
    assert args[2].grad is None or args[2].grad.item() == 0.0  # the student sample gets no gradient
    margin = plad_loss(*pair(*args, scores=(torch.tensor([1.0]), torch.tensor([0.0]))), objective("margin"))
    assert margin["loss"].item() == 3.0
    with pytest.raises(ValueError, match="needs each side's scores"):
        plad_loss(*pair(*args), objective("margin"))
    with pytest.raises(ValueError, match="expected one of"):
        plad_loss(*pair(*args), objective("ipo"))
    with pytest.raises(ValueError, match="needs the reference's log-probs"):
        plad_loss(*pair(*args), objective("dpo"))


def test_dpo_is_the_logistic_loss_on_log_ratios_to_the_reference():
    # chosen -6 (reference -7), rejected -4 (reference -3): log-ratios +1 and -1, beta 0.5:
    # -log sigmoid(0.5 * (1 - (-1))) = log(1 + e^-1); the reward accuracy counts the ratio gap (+2 > 0), not the
    # raw log-probs (-6 < -4), and the margin is that gap, 2.
    chosen, rejected = torch.tensor([-6.0], requires_grad=True), torch.tensor([-4.0])
    sides = (
        Sequences(chosen, torch.tensor([3.0]), None, torch.tensor([-7.0])),
        Sequences(rejected, torch.tensor([1.0]), None, torch.tensor([-3.0])),
    )
    out = plad_loss(*sides, objective("dpo", beta=0.5))
    assert math.isclose(out["loss"].item(), math.log(1 + math.exp(-1)), rel_tol=1e-6)
    assert out["accuracy"].item() == 1.0 and out["margin"].item() == 2.0
    # d/dc = -beta * sigmoid(-beta * 2) = -0.5 * sigmoid(-1)
    out["loss"].backward()
    assert math.isclose(chosen.grad.item(), -0.5 / (1 + math.e), rel_tol=1e-6)
    # At the start the student is its own reference: every ratio 0, the loss log 2, whatever the log-probs.
    same = Sequences(chosen.detach(), torch.tensor([3.0]), None, chosen.detach())
    start = plad_loss(same, Sequences(rejected, torch.tensor([1.0]), None, rejected), objective("dpo", beta=0.1))
    assert math.isclose(start["loss"].item(), math.log(2), rel_tol=1e-6)
    # With the NLL anchor (RPO's recipe): + lambda * 6 / 3.
    anchored = plad_loss(*sides, objective("dpo", beta=0.5, nll_weight=1.0))
    assert math.isclose(anchored["loss"].item(), math.log(1 + math.exp(-1)) + 2.0, rel_tol=1e-6)


def test_token_kd_is_forward_kl_per_response_token_by_hand():
    from plad_ray.losses_token import token_kd_loss

    # One sequence of 3 positions, vocabulary 2. Logits at position t predict token t+1, so with
    # response_mask [0, 1, 1] positions 0 and 1 are scored; position 2 predicts nothing.
    teacher = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.3, 0.7]]]))
    student = torch.log(torch.tensor([[[0.8, 0.2], [0.9, 0.1], [0.1, 0.9]]])).requires_grad_()
    mask = torch.tensor([[0, 1, 1]])
    kl_0 = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    kl_1 = 0.0  # same distribution
    loss = token_kd_loss(student, teacher, mask)
    assert loss.item() == pytest.approx((kl_0 + kl_1) / 2, rel=1e-5)
    loss.backward()
    assert student.grad[0, 2].abs().sum() == 0  # the unscored last position gets no gradient
    assert student.grad[0, 0].abs().sum() > 0
    only_first = token_kd_loss(student, teacher, torch.tensor([[0, 1, 0]]))
    assert only_first.item() == pytest.approx(kl_0, rel=1e-5)


@pytest.mark.parametrize("loss_type", ["token_kd", "onpolicy_kd", "contrastive"])
def test_plad_loss_token_terms_train_the_term_and_report_the_ranking(loss_type):
    kd = torch.tensor(0.7, requires_grad=True)
    out = plad_loss(
        *pair(torch.tensor([-1.0]), torch.tensor([2.0]), torch.tensor([-3.0]), torch.tensor([2.0])),
        objective(loss_type),
        token_kd=kd,
    )
    assert out["loss"] is kd
    assert out["rank_loss"].item() == 0.0 and out["accuracy"].item() == 1.0
    # the hinge is reported, not trained: sequence log-probs -3 (chosen) vs -2, beta 1 -> 1 - (-3 + 2) = 2
    worse = plad_loss(
        *pair(torch.tensor([-3.0], requires_grad=True), torch.tensor([2.0]), torch.tensor([-2.0]), torch.tensor([2.0])),
        objective(loss_type),
        token_kd=kd,
    )
    assert worse["rank_loss"].item() == pytest.approx(2.0) and not worse["rank_loss"].requires_grad
    with pytest.raises(ValueError, match=loss_type):
        plad_loss(
            *pair(torch.tensor([-1.0]), torch.tensor([2.0]), torch.tensor([-3.0]), torch.tensor([2.0])),
            objective(loss_type),
        )


def test_plad_loss_leaves_identical_pairs_out_of_the_ranking_but_not_the_nll():
    # Pair 0 is ranked (hinge max(0, 1 - (-1) + (-3)) = 0 ... chosen -1 > rejected -3: margin 2, loss 0);
    # pair 1 has the same text on both sides (ranked 0): its constant hinge beta = 1 must not count.
    # NLL over both chosen outputs: (1 + 4) / (2 + 2) = 1.25 per token.
    c, nc = torch.tensor([-1.0, -4.0], requires_grad=True), torch.tensor([2.0, 2.0])
    r, nr = torch.tensor([-3.0, -4.0]), torch.tensor([2.0, 2.0])
    out = plad_loss(*pair(c, nc, r, nr), objective(nll_weight=1.0), ranked_B=torch.tensor([1.0, 0.0]))
    assert out["rank_loss"].item() == pytest.approx(0.0)
    assert out["nll"].item() == pytest.approx(1.25)
    assert out["accuracy"].item() == 1.0 and out["margin"].item() == pytest.approx(2.0)
    out["loss"].backward()
    # Only the NLL reaches the chosen log-probs: d/dc of -(c0 + c1) / 4 = -0.25 each.
    assert c.grad.tolist() == pytest.approx([-0.25, -0.25])
    # No ranked pair at all: the ranking part is 0, the NLL still trains.
    none = plad_loss(*pair(c, nc, r, nr), objective(nll_weight=1.0), ranked_B=torch.tensor([0.0, 0.0]))
    assert none["rank_loss"].item() == 0.0 and none["loss"].item() == pytest.approx(1.25)


def test_plad_loss_listwise_over_k_samples_with_a_mask():
    # Prompt 0: chosen -1, samples -1.5 and -4 -> violations max(0, 1 - (-1) + s): 0.5, 0 -> mean 0.25.
    # Prompt 1: chosen -2, one real sample -1 (second masked) -> 1 - (-2) + (-1) = 2.
    # Listwise loss = mean over prompts (0.25 + 2) / 2 = 1.125; pairs ranked right: (-1 > -1.5), (-1 > -4) of 3 real.
    c, nc = torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 1.0])
    r_BK, nr_BK = torch.tensor([[-1.5, -4.0], [-1.0, 0.0]]), torch.ones(2, 2)
    mask_BK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    out = plad_loss(*pair(c, nc, r_BK, nr_BK), objective("listwise"), rejected_mask_BK=mask_BK)
    assert out["rank_loss"].item() == pytest.approx(1.125)
    assert out["accuracy"].item() == pytest.approx(2 / 3)
    assert out["margin"].item() == pytest.approx((0.5 + 3.0 - 1.0) / 3)
    assert out["loss"].item() == pytest.approx(1.125)  # nll_weight 0 here
    # Listwise on pairs (K = 1, held-out evaluation) is the hinge over the ranked pairs.
    sides = pair(c, nc, torch.tensor([-1.5, -1.0]), torch.ones(2))
    pairs = plad_loss(*sides, objective("listwise"), ranked_B=torch.tensor([1.0, 1.0]))
    assert pairs["rank_loss"].item() == pytest.approx((0.5 + 2.0) / 2)


def test_step_term_scales_make_accumulated_micro_batches_train_the_whole_batch_mean():
    # 16 pairs: 4 unranked (identical sides), response lengths 1-9. The engine divides each of the
    # 2 micro-batches' losses by 2 (accumulation); with the scales their sum is the loss of all 16.
    from plad_ray.losses import step_term_scales

    g = torch.Generator().manual_seed(0)
    chosen, rejected = -torch.rand(16, generator=g) * 20, -torch.rand(16, generator=g) * 20
    tokens_c, tokens_r = (
        torch.randint(1, 10, (16,), generator=g).float(),
        torch.randint(1, 10, (16,), generator=g).float(),
    )
    ranked = torch.tensor([0.0, 1, 1, 1] * 4)
    ranked[1] = 0  # the first half holds 5 unranked pairs, the second 3: unequal denominators

    def loss(sl, scales=(1.0, 1.0)):
        return plad_loss(
            *pair(chosen[sl], tokens_c[sl], rejected[sl], tokens_r[sl]),
            objective(nll_weight=1.0),
            ranked_B=ranked[sl],
            term_scales=scales,
        )["loss"]

    whole = loss(slice(0, 16))
    halves = [slice(0, 8), slice(8, 16)]
    plain = sum(loss(h) for h in halves) / 2
    scaled = (
        sum(
            loss(
                h,
                step_term_scales(
                    ranked[h].sum().item(), tokens_c[h].sum().item(), ranked.sum().item(), tokens_c.sum().item(), 2, 1
                ),
            )
            for h in halves
        )
        / 2
    )
    assert not torch.isclose(plain, whole, rtol=1e-3)  # a mean of micro means is not the batch mean
    assert torch.isclose(scaled, whole, rtol=1e-6)
    # Two ranks of one micro-batch each (gradients averaged over ranks): the same identity.
    ranks = (
        sum(
            loss(
                h,
                step_term_scales(
                    ranked[h].sum().item(), tokens_c[h].sum().item(), ranked.sum().item(), tokens_c.sum().item(), 1, 2
                ),
            )
            for h in halves
        )
        / 2
    )
    assert torch.isclose(ranks, whole, rtol=1e-6)
    assert step_term_scales(0, 5, 0, 10, 2, 1) == (0.0, 1.0)  # no ranked pair in the step: nothing to rank
