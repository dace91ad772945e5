"""Sequence packing (train.packing): where each sequence lands, and that the student's log-probs of a
packed micro-batch equal the padded one's (the tiny student, fp32, transformers' SDPA on CPU)."""

import numpy as np
import pytest
import torch

from plad_ray.losses import sequence_logps
from plad_ray.train.batching import collate_pairs
from plad_ray.train.packing import pack, unpack_logits


def test_first_fit_by_decreasing_length_and_positions_from_zero():
    ids = np.array([[1, 2, 3, 4, 5], [6, 7, 0, 0, 0], [8, 9, 10, 0, 0], [11, 12, 13, 14, 0]])
    mask = (ids > 0).astype(np.int64)
    out = pack(ids, mask, pad_id=0)
    # lengths 5, 2, 3, 4 in rows of 5: [5], [4 + pad], [3, 2]
    assert out["packed_input_ids"].tolist() == [[1, 2, 3, 4, 5], [11, 12, 13, 14, 0], [8, 9, 10, 6, 7]]
    assert out["packed_position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    flat = out["packed_input_ids"].reshape(-1)
    assert (flat[out["unpack_index"]] * mask == ids).all()  # every real token back in its place
    assert out["packed_input_ids"].size / ids.size == 0.75


def test_rows_wider_than_the_longest_sequence_when_they_leave_less_padding():
    from plad_ray.train.packing import row_width

    # rows of 10: [10], [6, 2], [6], [6], [6] = 50 slots; of 20: [10, 6, 2], [6, 6, 6] = 40; of 30: 60
    lengths = np.array([10, 6, 6, 6, 6, 2])
    assert row_width(lengths, 10) == 20
    ids = np.zeros((6, 10), dtype=np.int64)
    mask = (np.arange(10)[None, :] < lengths[:, None]).astype(np.int64)
    ids[mask == 1] = np.arange(1, lengths.sum() + 1)
    out = pack(ids, mask, pad_id=0)
    assert out["packed_input_ids"].shape == (2, 20) and (out["packed_input_ids"] > 0).sum() == 36
    assert (out["packed_input_ids"].reshape(-1)[out["unpack_index"]] * mask == ids).all()
    assert row_width(np.array([5, 5]), 5) == 5  # already full: the narrowest of equals


@pytest.fixture(scope="module")
def student(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32).eval()


def batch_of_pairs(vocab: int, seed: int = 0) -> dict:
    """8 pairs of random prompts and responses of 3-20 tokens (chosen and rejected lengths differ)."""
    rng = np.random.default_rng(seed)

    def seqs(low, high):
        return [rng.integers(3, vocab, rng.integers(low, high)).astype(np.int32) for _ in range(8)]

    return collate_pairs({"prompt_ids": seqs(3, 8), "chosen_ids": seqs(3, 20), "rejected_ids": seqs(3, 20)}, pad_id=0)


def test_packed_log_probs_equal_the_padded_ones(student):
    batch = batch_of_pairs(student.config.vocab_size)
    packed = {
        k: torch.from_numpy(v) for k, v in pack(batch["input_ids"].numpy(), batch["attention_mask"].numpy(), 0).items()
    }
    assert packed["packed_input_ids"].shape[0] < batch["input_ids"].shape[0]
    with torch.no_grad():
        padded_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        packed_logits = unpack_logits(
            student(
                input_ids=packed["packed_input_ids"], use_cache=False, position_ids=packed["packed_position_ids"]
            ).logits,
            packed["unpack_index"],
        )
        # The same rows with positions that do not restart: sequences would attend to each other.
        leaked = unpack_logits(
            student(input_ids=packed["packed_input_ids"], use_cache=False).logits, packed["unpack_index"]
        )

    def token_logps(logits):  # each scored response token's log-prob
        logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        return logps[batch["response_mask"][:, 1:] > 0]

    assert torch.allclose(token_logps(packed_logits), token_logps(padded_logits), atol=1e-5, rtol=0)
    # The sequences' sums (what the losses read), to fp32's rounding of sums of 20-200 nats.
    want, n = sequence_logps(padded_logits, batch["input_ids"], batch["response_mask"])
    got, m = sequence_logps(packed_logits, batch["input_ids"], batch["response_mask"])
    assert torch.equal(n, m) and (n > 0).all()
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-6), (got - want).abs().max()
    leaked_logps = sequence_logps(leaked, batch["input_ids"], batch["response_mask"])[0]
    assert ((leaked_logps - want).abs() / n).max() > 1.0  # nats per token, where sequences see each other


def test_packed_gradients_equal_the_padded_ones(student):
    batch = batch_of_pairs(student.config.vocab_size, seed=1)
    packed = {
        k: torch.from_numpy(v) for k, v in pack(batch["input_ids"].numpy(), batch["attention_mask"].numpy(), 0).items()
    }

    def grads(logits_fn):
        student.zero_grad()
        sequence_logps(logits_fn(), batch["input_ids"], batch["response_mask"])[0].sum().backward()
        return [p.grad.clone() for p in student.parameters()]

    padded = grads(lambda: student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    packed_grads = grads(
        lambda: unpack_logits(
            student(
                input_ids=packed["packed_input_ids"], use_cache=False, position_ids=packed["packed_position_ids"]
            ).logits,
            packed["unpack_index"],
        )
    )
    for a, b in zip(padded, packed_grads):  # measured: at most 5.6e-7 of each parameter's gradient norm
        assert (a - b).norm() <= 1e-5 * a.norm()


class _Engine(torch.nn.Module):
    """What check_packing calls: a module with `device`; `leak` drops the position ids, as a model whose
    attention ignored them would."""

    def __init__(self, model, leak: bool):
        super().__init__()
        self.model, self.leak, self.device = model, leak, torch.device("cpu")

    def forward(self, **kwargs):
        if self.leak:
            kwargs.pop("position_ids", None)
        return self.model(**kwargs)


def test_the_first_micro_batch_check_refuses_a_model_that_lets_packed_sequences_meet(student):
    from plad_ray.errors import ConfigError
    from plad_ray.train.feed import check_packing

    batch = batch_of_pairs(student.config.vocab_size, seed=2)
    batch.update(
        {
            k: torch.from_numpy(v)
            for k, v in pack(batch["input_ids"].numpy(), batch["attention_mask"].numpy(), 0).items()
        }
    )
    assert check_packing(_Engine(student, leak=False), batch) < 1e-4
    with pytest.raises(
        ConfigError,
        match=r"config key train.packing: packed and padded log-probs of the first "
        r"micro-batch differ by [0-9.]+ nats per token .* set train.packing=false",
    ):
        check_packing(_Engine(student, leak=True), batch)
