"""What one training forward of the tiny student computes for the objectives that need more than the batch.

train.loss.seqkd_first, the paper's recipe: seqkd for the first share of the optimizer steps, then the ranking
objective. Which loss a step trains (LossConfig.at_step, the worker's _phase), and what it backpropagates: the NLL
of the teacher's outputs alone, then the hinge plus the NLL. dpo: the same sequences under the frozen reference."""

import numpy as np
import pytest
import torch

from plad_ray.config_train import LossConfig, TrainConfig
from plad_ray.model_card import _objective
from plad_ray.train.batching import collate_pairs
from plad_ray.train.feed import forward
from plad_ray.train.prepare import trains_identical_pairs
from plad_ray.train.worker import _phase


def test_the_first_share_of_the_steps_trains_seqkd_then_the_objective():
    loss = LossConfig(type="hinge", nll_weight=0.0, seqkd_first=0.5)
    assert loss.seqkd_steps(20) == 10 and loss.seqkd_steps(7) == 4  # the nearest step
    assert [loss.at_step(s, 20).type for s in (0, 9, 10, 19)] == ["seqkd", "seqkd", "hinge", "hinge"]
    assert loss.at_step(10, 20) is loss
    plain = LossConfig(type="hinge")
    assert all(plain.at_step(s, 20) is plain for s in range(20))


def test_the_worker_switches_once_and_says_so():
    train = TrainConfig(loss=LossConfig(type="logistic", seqkd_first=0.25))
    lines = []
    phases = [_phase(train, s, 8, lines.append) for s in range(8)]
    assert [p.loss.type for p in phases] == ["seqkd"] * 2 + ["logistic"] * 6
    assert all(p is train for p in phases[2:]) and phases[0].learning_rate == train.learning_rate
    assert lines == ["[train] step 2: seqkd's 2 steps are done; logistic from here"]


def test_identical_pairs_are_kept_for_the_seqkd_phase():
    # the hinge without NLL drops pairs whose sides are the same text; seqkd first trains on them
    assert not trains_identical_pairs(TrainConfig(loss=LossConfig(type="hinge", nll_weight=0.0)))
    assert trains_identical_pairs(TrainConfig(loss=LossConfig(type="hinge", nll_weight=0.0, seqkd_first=0.5)))


def test_the_model_card_names_the_recipe():
    loss = vars(LossConfig(type="hinge", beta=0.5, seqkd_first=0.5))
    assert (
        _objective(loss)
        == "hinge, beta 0.5, plus 1.0 x NLL of the teacher's outputs, after seqkd for the first 50% of the steps"
    )


@pytest.fixture(scope="module")
def student(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32)


def _pairs(vocab: int) -> dict:
    rng = np.random.default_rng(0)
    seqs = lambda low, high: [rng.integers(3, vocab, rng.integers(low, high)).astype(np.int32) for _ in range(6)]  # noqa: E731
    return collate_pairs({"prompt_ids": seqs(3, 8), "chosen_ids": seqs(3, 12), "rejected_ids": seqs(3, 12)}, pad_id=0)


def _gradient(student, batch, train) -> tuple[dict, torch.Tensor]:
    student.zero_grad()
    stats = forward(student, batch, train)
    stats["loss"].backward()
    return stats, torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])


def test_a_seqkd_step_trains_the_nll_alone_and_a_later_step_the_hinge_too(student):
    batch = _pairs(student.config.vocab_size)
    train = TrainConfig(loss=LossConfig(type="hinge", beta=5.0, nll_weight=1.0, seqkd_first=0.5))
    early, grad_early = _gradient(student, batch, _phase(train, 3, 10, print))
    late, grad_late = _gradient(student, batch, _phase(train, 5, 10, print))
    _, grad_seqkd = _gradient(student, batch, TrainConfig(loss=LossConfig(type="seqkd")))
    # Same batch, same weights: the seqkd phase's loss is the NLL, its gradient seqkd's; afterwards the hinge adds on.
    assert early["loss"].item() == pytest.approx(early["nll"].item())
    assert torch.allclose(grad_early, grad_seqkd)
    assert late["rank_loss"].item() > 0  # beta 5 nats: the random pairs owe a margin
    assert late["loss"].item() == pytest.approx(late["rank_loss"].item() + late["nll"].item(), rel=1e-5)
    assert not torch.allclose(grad_late, grad_early)


def test_dpo_scores_the_batch_under_the_frozen_reference_too(student, tiny_models):
    """train.loss.type=dpo: forward reads the reference's log-probs of the same sequences. The student is its own
    reference before its first step (loss log 2, every log-ratio 0); a student moved away from it is not."""
    import copy
    import math

    from transformers import AutoModelForCausalLM

    from plad_ray.train.feed import Frozen

    reference = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32).eval()
    batch = _pairs(student.config.vocab_size)
    dpo = TrainConfig(loss=LossConfig(type="dpo", beta=0.1, nll_weight=0.0))
    start = forward(student, batch, dpo, Frozen(reference=reference))
    assert start["loss"].item() == pytest.approx(math.log(2), abs=1e-5) and start["margin"].item() == pytest.approx(0)
    moved = copy.deepcopy(student)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    later = forward(moved, batch, dpo, Frozen(reference=reference))
    assert abs(later["margin"].item()) > 1e-3 and later["loss"].item() != pytest.approx(math.log(2), abs=1e-4)
    with pytest.raises(ValueError, match="needs the reference's log-probs"):
        forward(student, batch, dpo)  # no reference loaded: refused, not trained as the plain logistic loss
