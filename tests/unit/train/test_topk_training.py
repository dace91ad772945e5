"""The teacher's top-k on the way into a training step: cut with its response (PairTokenizer), placed at
its tokens' positions (collate_topk), and met by the student's log-probs one position earlier
(feed.student_at_teacher_topk); the objectives themselves are tests/unit/test_losses_topk.py."""

import numpy as np
import pytest
import torch

from plad_ray.train.batching import collate_pairs, out_topk
from plad_ray.train.feed import student_at_teacher_topk, topk_term


def test_a_sides_top_k_is_cut_with_its_response():
    out = {"rejected_topk_ids": [], "rejected_topk_logps": [], "rejected_topk_tokens": []}
    row = {
        "rejected_topk_ids": [1, 2, 3, 4, 5, 6],
        "rejected_topk_logps": [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6],
        "rejected_topk_tokens": 3,
    }  # 3 tokens x k = 2
    out_topk(out, row, "rejected", kept=2)
    out_topk(out, row, "rejected", kept=5)  # the teacher scored fewer tokens than training keeps: its 3
    out_topk(out, {**row, "rejected_topk_ids": [], "rejected_topk_logps": [], "rejected_topk_tokens": 0}, "rejected", 4)
    assert [a.tolist() for a in out["rejected_topk_ids"]] == [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6], []]
    assert out["rejected_topk_tokens"] == [2, 3, 0]
    assert out["rejected_topk_logps"][0].dtype == np.float32


def test_the_top_k_sits_at_the_positions_of_the_tokens_it_scores():
    # two pairs; prompts of 2 and 1 tokens; responses of 2 and 3; k = 2; only the samples have a top-k
    batch = {
        "prompt_ids": [np.array([7, 8]), np.array([9])],
        "chosen_ids": [np.array([1, 2]), np.array([3, 4, 5])],
        "rejected_ids": [np.array([1, 1]), np.array([4, 4, 4])],
        "rejected_topk_ids": [np.array([10, 11, 12, 13]), np.array([20, 21, 22, 23, 24, 25])],
        "rejected_topk_logps": [
            np.array([-1, -2, -3, -4], np.float32),
            np.array([-5, -6, -7, -8, -9, -10], np.float32),
        ],
        "rejected_topk_tokens": np.array([2, 3]),
    }
    out = collate_pairs(batch, pad_id=0)
    assert out["topk_ids"].shape == (4, 4, 2) and out["topk_mask"].shape == (4, 4)
    assert out["topk_mask"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 1, 1]]
    assert out["response_mask"][2:].tolist() == out["topk_mask"][2:].long().tolist()  # the samples' response tokens
    assert out["topk_ids"][2, 2].tolist() == [10, 11] and out["topk_ids"][2, 3].tolist() == [12, 13]
    assert out["topk_ids"][3, 1:].tolist() == [[20, 21], [22, 23], [24, 25]]
    assert out["topk_logps"][3, 3].tolist() == [-9, -10]


def test_the_student_meets_the_teacher_one_position_earlier():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6)
    ids = torch.randint(0, 6, (2, 4, 3))
    got = student_at_teacher_topk(logits, ids, torch.ones(2, 4))  # every position scored
    want = torch.log_softmax(logits, -1)
    assert got.shape == (2, 3, 3)
    for n in range(2):
        for t in range(1, 4):
            assert torch.allclose(got[n, t - 1], want[n, t - 1, ids[n, t]], atol=1e-6)


@pytest.mark.parametrize("loss_type", ["onpolicy_kd", "contrastive"])
def test_a_student_that_is_the_teacher_has_nothing_to_learn(loss_type):
    """Top-k taken from the student's own distribution: every divergence is 0 (up to rounding), and it rises
    when the teacher's top-k log-probs differ."""
    from plad_ray.config import LossConfig, TrainConfig

    torch.manual_seed(0)
    logits = torch.randn(4, 5, 8)  # 2 pairs: rows 0-1 chosen, 2-3 rejected
    logps = torch.log_softmax(logits, -1)
    top = torch.topk(logps[:, :-1], 3, dim=-1)  # what position t - 1 predicts, placed at t
    ids = torch.zeros(4, 5, 3, dtype=torch.long)
    teacher = torch.zeros(4, 5, 3)
    ids[:, 1:], teacher[:, 1:] = top.indices, top.values
    mask = torch.zeros(4, 5)
    mask[:, 2:] = 1
    batch = {"topk_ids": ids, "topk_logps": teacher, "topk_mask": mask}
    train = TrainConfig(loss=LossConfig(type=loss_type))
    same = topk_term(logits, batch, 2, train)
    assert abs(same.item()) < 1e-5
    other = topk_term(logits, {**batch, "topk_logps": teacher.flip(-1)}, 2, train)
    assert other.item() > 0.01
