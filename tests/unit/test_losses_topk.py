"""Losses on the teacher's top-k log-probs (plad_ray.losses), against values derived by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from plad_ray.losses import margin_loss
from plad_ray.losses_token import contrastive_topk_loss, teacher_scores, token_kd_loss, topk_buckets, topk_divergence


def logps(*probs):
    """[1, T=1, k] log-probs of the given top-k probabilities."""
    return torch.log(torch.tensor([[list(probs)]], dtype=torch.float32))


ONE = torch.ones(1, 1)
# One position, k = 1: the teacher gives its top token 0.5 (tail 0.5), the student gives it 0.25 (tail 0.75).
T, S = logps(0.5), logps(0.25)
FORWARD = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(T || S) = 0.5 ln(4/3)
REVERSE = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # KL(S || T)


def test_buckets_add_the_tail():
    buckets = topk_buckets(logps(0.5, 0.2, 0.1))[0, 0].exp()
    assert buckets.tolist() == pytest.approx([0.5, 0.2, 0.1, 0.2], abs=1e-6)
    tiny = topk_buckets(logps(1e-6))[0, 0].exp()  # a tail close to 1 stays exact
    assert tiny.tolist() == pytest.approx([1e-6, 1 - 1e-6], rel=1e-6)


def test_divergences_by_hand():
    assert topk_divergence(S, T, ONE, "forward_kl").item() == pytest.approx(FORWARD, rel=1e-5)
    assert topk_divergence(S, T, ONE, "reverse_kl").item() == pytest.approx(REVERSE, rel=1e-5)
    m = [0.5 * 0.5 + 0.5 * 0.25, 0.5 * 0.5 + 0.5 * 0.75]  # beta = 0.5: M = (T + S) / 2 = [0.375, 0.625]
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    )
    assert topk_divergence(S, T, ONE, "jsd", beta=0.5).item() == pytest.approx(jsd, rel=1e-5)
    m = [0.9 * 0.5 + 0.1 * 0.25, 0.9 * 0.5 + 0.1 * 0.75]  # beta = 0.9: M leans to the teacher
    jsd = 0.9 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.1 * (
        0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    )
    assert topk_divergence(S, T, ONE, "jsd", beta=0.9).item() == pytest.approx(jsd, rel=1e-5)
    assert topk_divergence(T, T, ONE, "reverse_kl").item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="jsd needs 0 < beta < 1"):
        topk_divergence(S, T, ONE, "jsd", beta=1.0)


def test_a_top_k_of_the_whole_vocabulary_is_the_full_kl():
    torch.manual_seed(0)
    student_BTV, teacher_BTV = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask_BT = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    s, t = F.log_softmax(student_BTV, -1), F.log_softmax(teacher_BTV, -1)
    # token_kd_loss scores positions :-1 against mask[:, 1:]; the same positions here.
    full = token_kd_loss(student_BTV, teacher_BTV, mask_BT)
    topk = topk_divergence(s[:, :-1], t[:, :-1], mask_BT[:, 1:], "forward_kl")
    assert topk.item() == pytest.approx(full.item(), rel=1e-4)


def test_gradients_stay_finite_when_the_top_k_holds_all_the_mass():
    torch.manual_seed(2)
    student = F.log_softmax(torch.randn(1, 3, 6), -1).detach().requires_grad_()
    teacher = F.log_softmax(torch.randn(1, 3, 6), -1)
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        student.grad = None
        topk_divergence(student, teacher, torch.ones(1, 3), kind).backward()
        assert torch.isfinite(student.grad).all(), kind


def test_fewer_ids_give_a_lower_bound():
    torch.manual_seed(1)
    s, t = F.log_softmax(torch.randn(1, 4, 50), -1), F.log_softmax(torch.randn(1, 4, 50), -1)
    ids = t.topk(5, -1).indices  # the teacher's top 5; the student's log-probs of the same ids
    full = topk_divergence(s, t, torch.ones(1, 4), "reverse_kl")
    five = topk_divergence(s.gather(-1, ids), t.gather(-1, ids), torch.ones(1, 4), "reverse_kl")
    assert 0 < five.item() < full.item()


def test_only_masked_in_tokens_count_and_only_the_student_gets_a_gradient():
    student = torch.cat([S, logps(0.5)], 1).requires_grad_()  # position 2: the student agrees with the teacher
    teacher = torch.cat([T, logps(0.5)], 1).requires_grad_()
    both = topk_divergence(student, teacher, torch.ones(1, 2), "reverse_kl")
    assert both.item() == pytest.approx(REVERSE / 2, rel=1e-5)
    assert topk_divergence(student, teacher, torch.tensor([[1, 0]]), "reverse_kl").item() == pytest.approx(
        REVERSE, rel=1e-5
    )
    both.backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


def test_contrastive_by_hand():
    alpha = 0.1
    # On the teacher's output (chosen): SKL = KL(T || alpha T + (1 - alpha) S).
    mix = [alpha * 0.5 + 0.9 * 0.25, alpha * 0.5 + 0.9 * 0.75]
    skl = 0.5 * math.log(0.5 / mix[0]) + 0.5 * math.log(0.5 / mix[1])
    # On the student's sample (rejected): the student gives 0.8 (tail 0.2), the teacher 0.3 (tail 0.7).
    mix = [alpha * 0.8 + 0.9 * 0.3, alpha * 0.2 + 0.9 * 0.7]
    srkl = 0.8 * math.log(0.8 / mix[0]) + 0.2 * math.log(0.2 / mix[1])
    loss = contrastive_topk_loss(S, T, ONE, logps(0.8), logps(0.3), ONE, alpha=alpha)
    assert loss.item() == pytest.approx(skl + srkl, rel=1e-5)
    # alpha = 0: plain forward KL on y+ plus plain reverse KL on y-.
    plain = contrastive_topk_loss(S, T, ONE, S, T, ONE, alpha=0.0)
    assert plain.item() == pytest.approx(FORWARD + REVERSE, rel=1e-5)


def test_contrastive_pulls_up_the_teachers_output_and_pushes_down_the_students_sample():
    chosen = S.clone().requires_grad_()  # the student under-weights the teacher's token on y+
    rejected = logps(0.8).requires_grad_()  # and over-weights its own token on y-, where the teacher says 0.3
    contrastive_topk_loss(chosen, T, ONE, rejected, logps(0.3), ONE).backward()
    assert chosen.grad.item() < 0  # descent raises the student's log-prob of the teacher's token on y+
    assert rejected.grad.item() > 0  # and lowers its log-prob of its own token on y-


def test_teacher_judged_margin():
    # The teacher's log-probs of the tokens that are there; y+ has 2 tokens, y- 3 (one padded position).
    chosen_BT = torch.tensor([[-0.1, -0.3, 0.0]])
    rejected_BT = torch.tensor([[-1.0, -2.0, -3.0]])
    s_plus = teacher_scores(chosen_BT, torch.tensor([[1, 1, 0]]))
    s_minus = teacher_scores(rejected_BT, torch.tensor([[1, 1, 1]]))
    assert s_plus.tolist() == pytest.approx([-0.2]) and s_minus.tolist() == pytest.approx([-2.0])
    # margin owed: beta * (s+ - s-) = 0.5 * 1.8 = 0.9; the student ranks y+ above y- by 0.4: loss 0.5.
    loss = margin_loss(torch.tensor([-5.0]), torch.tensor([-5.4]), s_plus, s_minus, beta=0.5)
    assert loss.item() == pytest.approx(0.5, rel=1e-6)
