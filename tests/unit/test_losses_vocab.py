"""The vocabulary-wide terms computed in chunks of scored positions (plad_ray.losses.topk_token_logps and
token_kd_loss) against hand-derived values and against their dense references (dense_topk_token_logps,
dense_token_kd_loss), in value and gradient; and a check that no fp32 copy of the logits is made or kept."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from plad_ray.losses import dense_sequence_logps, dense_topk_token_logps, sequence_logps, topk_token_logps
from plad_ray.losses_token import contrastive_topk_loss, dense_token_kd_loss, token_kd_loss, topk_divergence


def test_topk_logps_and_their_gradient_by_hand():
    # Vocabulary 2; logits [0, ln 3] at position 0 give p = [1/4, 3/4]. Position 1's top-2 ids [1, 0] are what
    # position 0 predicts: log(3/4), log(1/4). With upstream gradients g = [1, 2] for ids [1, 0], the logits'
    # gradient is onehot-scatter(g) - softmax * sum g = [2, 1] - [1/4, 3/4] * 3 = [1.25, -1.25].
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0]]], requires_grad=True)
    ids = torch.tensor([[[0, 0], [1, 0]]])
    got = topk_token_logps(logits, ids, torch.tensor([[0, 1]]))
    assert got.shape == (1, 1, 2)
    assert got[0, 0].tolist() == pytest.approx([math.log(0.75), math.log(0.25)], rel=1e-6)
    (got * torch.tensor([1.0, 2.0])).sum().backward()
    assert logits.grad[0, 0].tolist() == pytest.approx([1.25, -1.25], rel=1e-6)
    assert logits.grad[0, 1].tolist() == [0.0, 0.0]  # the last position predicts nothing here


def test_token_kd_gradient_by_hand():
    # Teacher [0.5, 0.5], student [0.8, 0.2] at position 0; the same distribution at position 1; two scored
    # tokens. d loss / d student logits = (softmax_S - p_T) / 2 = [0.15, -0.15] at 0, 0 at 1 and 2.
    teacher = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.3, 0.7]]]))
    student = torch.log(torch.tensor([[[0.8, 0.2], [0.9, 0.1], [0.1, 0.9]]])).requires_grad_()
    token_kd_loss(student, teacher, torch.tensor([[0, 1, 1]])).backward()
    assert student.grad[0, 0].tolist() == pytest.approx([0.15, -0.15], rel=1e-5)
    assert student.grad[0, 1:].abs().max().item() < 1e-7


def batch(dtype, vocab=37, k=4, seed=0):
    """Logits [4, 9, V] (x3 so the softmax is peaked), top-k ids at each position, a top-k mask with a row
    that has nothing scored, and upstream weights that differ per scored value."""
    torch.manual_seed(seed)
    logits = (torch.randn(4, 9, vocab) * 3).to(dtype)
    ids = torch.stack([torch.randperm(vocab)[:k] for _ in range(4 * 9)]).view(4, 9, k)
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 1, 0, 0, 0],
            [0, 1, 1, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 1, 1, 1, 0],
        ],
        dtype=torch.float32,
    )
    return logits, ids, mask, torch.randn(4, 8, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
def test_chunked_topk_logps_equal_the_dense_formula_in_value_and_gradient(dtype, chunk_rows):
    logits, ids, mask, weights = batch(dtype)
    scored = mask[:, 1:, None]
    results = []
    for fn in (
        lambda x: topk_token_logps(x, ids, mask, chunk_bytes=4 * 37 * chunk_rows),
        lambda x: dense_topk_token_logps(x, ids),
    ):
        leaf = logits.clone().requires_grad_(True)
        out = fn(leaf)
        (out * weights * scored).sum().backward()
        results.append((out.detach() * scored, leaf.grad))
    (chunked, grad_chunked), (dense, grad_dense) = results
    assert chunked.dtype == dense.dtype == torch.float32 and grad_chunked.dtype == dtype
    assert torch.allclose(chunked, dense, rtol=1e-5, atol=1e-5)
    assert torch.allclose(grad_chunked.float(), grad_dense.float(), rtol=1e-5, atol=1e-5)
    assert grad_chunked[2].abs().sum() == 0 and grad_chunked[:, -1].abs().sum() == 0  # nothing scored there
    assert grad_chunked.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("objective", ["reverse_kl", "forward_kl", "jsd", "contrastive"])
def test_top_k_objectives_on_chunked_logps_equal_the_dense_ones(dtype, objective):
    # What feed.topk_term computes: rows 0-1 are a pair's chosen side, rows 2-3 its rejected side.
    logits, ids, mask, _ = batch(dtype, seed=1)
    teacher = torch.log_softmax(torch.randn(4, 8, 6), -1)[..., :4]  # top 4 of 6: a tail of real mass
    results = []
    for fn in (
        lambda x: topk_token_logps(x, ids, mask, chunk_bytes=4 * 37 * 2),
        lambda x: dense_topk_token_logps(x, ids),
    ):
        leaf = logits.clone().requires_grad_(True)
        student, m = fn(leaf), mask[:, 1:]
        if objective == "contrastive":
            loss = contrastive_topk_loss(student[:2], teacher[:2], m[:2], student[2:], teacher[2:], m[2:])
        else:
            loss = topk_divergence(student[2:], teacher[2:], m[2:], kind=objective)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    (chunked, grad_chunked), (dense, grad_dense) = results
    assert chunked.item() > 0.01 and chunked.item() == pytest.approx(dense.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(grad_chunked.float(), grad_dense.float(), rtol=1e-5, atol=1e-5)
    assert grad_chunked.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
def test_chunked_token_kd_equals_the_dense_formula_in_value_and_gradient(dtype, chunk_rows):
    student, _, mask, _ = batch(dtype)
    torch.manual_seed(2)
    teacher = (torch.randn(4, 9, 37) * 3).to(dtype).requires_grad_(True)  # it must get no gradient all the same
    results = []
    for fn in (
        lambda s, t: token_kd_loss(s, t, mask, chunk_bytes=2 * 4 * 37 * chunk_rows),
        lambda s, t: dense_token_kd_loss(s, t, mask),
    ):
        leaf = student.clone().requires_grad_(True)
        loss = fn(leaf, teacher)
        (3.0 * loss).backward()
        results.append((loss.detach(), leaf.grad))
    (chunked, grad_chunked), (dense, grad_dense) = results
    assert chunked.dtype == dense.dtype == torch.float32 and grad_chunked.dtype == dtype
    assert chunked.item() > 0.1 and chunked.item() == pytest.approx(dense.item(), rel=1e-5)
    assert torch.allclose(grad_chunked.float(), grad_dense.float(), rtol=1e-5, atol=1e-5)
    assert grad_chunked[2].abs().sum() == 0 and grad_chunked[:, -1].abs().sum() == 0
    assert teacher.grad is None


def test_token_kd_with_nothing_scored_is_zero_with_zero_gradient():
    student = torch.randn(2, 5, 7, requires_grad=True)
    loss = token_kd_loss(student, torch.randn(2, 5, 7), torch.zeros(2, 5))
    loss.backward()
    assert loss.item() == 0.0 and student.grad.abs().sum() == 0
    with pytest.raises(ValueError, match=r"token_kd needs logits of one shape: student \(2, 5, 7\), teacher"):
        token_kd_loss(student, torch.randn(2, 5, 8), torch.ones(2, 5))


class Float32Blocks(TorchDispatchMode):
    """Every fp32 tensor of last dimension `vocab` an op creates (forward or backward), by its number of
    rows: the dense formulas make [N, T-1, V] ones, the chunked ones at most a chunk's."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, [0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() and t.shape[-1] == self.vocab:
                self.rows.append(t.numel() // self.vocab)
        return out


def run_watched(fn, vocab: int) -> tuple[int, int]:
    """(most rows of an fp32 [.., V] tensor created, most rows of an fp32 [.., V] tensor saved for backward)
    while fn() builds a loss and runs its backward."""
    saved = [0]

    def pack(t):
        if t.dtype == torch.float32 and t.dim() and t.shape[-1] == vocab:
            saved.append(t.numel() // vocab)
        return t

    with Float32Blocks(vocab) as created, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn().backward()
    return max(created.rows), max(saved)


def test_no_fp32_copy_of_the_logits_is_made_or_kept():
    # bf16 logits, as a bf16 model's forward leaves them: any fp32 tensor with a vocabulary axis is the loss's
    # own. With chunks of 2 positions none may have more than 2 rows; the dense references make [N, T-1, V]
    # ones (4 x 8 = 32 rows; token KD's from B x (T-1) too), which is what this test exists to catch.
    vocab, chunk = 37, 2 * 4 * 37
    logits, ids, mask, _ = batch(torch.bfloat16)
    teacher_logits = (torch.randn(4, 9, vocab) * 3).to(torch.bfloat16)
    teacher_topk = torch.log_softmax(torch.randn(4, 8, 6), -1)[..., :4]
    leaf = logits.clone().requires_grad_(True)

    def topk(fn):
        return lambda: topk_divergence(fn(leaf)[2:], teacher_topk[2:], mask[2:, 1:])

    chunked = {
        "top-k": topk(lambda x: topk_token_logps(x, ids, mask, chunk_bytes=chunk)),
        "token KD": lambda: token_kd_loss(leaf, teacher_logits, mask, chunk_bytes=2 * chunk),
        "sequence": lambda: sequence_logps(leaf, ids[..., 0], mask, chunk_bytes=chunk)[0].sum(),
    }
    dense = {
        "top-k": topk(lambda x: dense_topk_token_logps(x, ids)),
        "token KD": lambda: dense_token_kd_loss(leaf, teacher_logits, mask),
        "sequence": lambda: dense_sequence_logps(leaf, ids[..., 0], mask)[0].sum(),
    }
    for name, fn in chunked.items():
        assert run_watched(fn, vocab) == (2, 0), name  # created: a chunk of 2 positions at most; saved: none
    for name, fn in dense.items():
        created, saved = run_watched(fn, vocab)
        assert created == saved == 4 * 8, name
