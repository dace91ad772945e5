"""What each optimizer step feeds the student, and one micro-batch's forward.

The shard's rows become length-grouped micro-batches, gradient_accumulation_steps of them
per optimizer step; `term_counts` gives each micro-batch's share of its step's means.
`forward` runs one micro-batch through the model to the objective's figures: the training
loop (plad_ray.train.worker) and the held-out evaluation (plad_ray.train.heldout) share it.
"""

from typing import NamedTuple

import torch

from plad_ray.config import TrainConfig
from plad_ray.errors import ConfigError
from plad_ray.losses import Sequences, plad_loss, sequence_logps, topk_token_logps
from plad_ray.losses_token import contrastive_topk_loss, token_kd_loss, topk_divergence
from plad_ray.train.batching import collate_groups, collate_pairs, length_grouped
from plad_ray.train.packing import pack, unpack_logits


def optimizer_steps(shard, train: TrainConfig, pad_id: int, epoch: int):
    """The epoch's optimizer steps, each its gradient_accumulation_steps micro-batches (in hand before
    the first forward: the step's totals normalise every micro-batch's loss)."""
    step = []
    for batch in micro_batches(shard, train, pad_id, epoch):
        step.append(batch)
        if len(step) == train.gradient_accumulation_steps:
            yield step
            step = []


def term_counts(batch: dict, train: TrainConfig) -> tuple[float, float]:
    """(ranking terms, chosen response tokens) of a micro-batch: the denominators of plad_loss's means
    (ranked pairs; listwise: prompts; the NLL and token KD: the teacher outputs' scored tokens)."""
    listwise = "rejected_mask" in batch
    b = batch["rejected_mask"].shape[0] if listwise else batch["input_ids"].shape[0] // 2
    objective = train.loss.objective
    ranked = b if listwise or objective.groups_samples or "ranked" not in batch else batch["ranked"].sum().item()
    if objective.topk_tokens_side == "rejected":  # onpolicy_kd: its per-token mean is over the samples' scored tokens
        return float(ranked), float(batch["topk_mask"][b:, 1:].sum().item())
    return float(ranked), float(batch["response_mask"][:b, 1:].sum().item())


def micro_batches(shard, train: TrainConfig, pad_id: int, epoch: int):
    """The shard's micro-batches for one epoch, length-grouped. The shard is this rank's fixed, ordered
    split of the training pairs and the grouping is seeded, so an epoch's micro-batches are the same
    every time it is read: a resumed run skips exactly the ones it trained (README "Resuming").
    Listwise rows are whole prompts. Each batch carries `keys`, its pairs' "id#sample_index"."""
    group = train.micro_batch_size * train.length_grouping
    collate = collate_groups if train.loss.objective.groups_samples else collate_pairs
    for index, bucket in enumerate(shard.iter_batches(batch_size=group, batch_format="numpy")):
        for micro in length_grouped(bucket, train.micro_batch_size, seed=[train.seed, epoch, index]):
            batch = collate(micro, pad_id)
            if train.packing:
                batch.update(
                    {
                        k: torch.from_numpy(v)
                        for k, v in pack(batch["input_ids"].numpy(), batch["attention_mask"].numpy(), pad_id).items()
                    }
                )
            samples = micro["sample_index"] if "sample_index" in micro else [0] * len(micro["id"])
            batch["keys"] = [f"{i}#{s}" for i, s in zip(micro["id"], samples)]
            yield batch


class Frozen(NamedTuple):
    """The frozen models beside the student on a rank, each loaded only for the objective that reads it
    (plad_ray.objectives): the teacher (token_kd) and the reference, the round's initial student (dpo)."""

    teacher: torch.nn.Module | None = None
    reference: torch.nn.Module | None = None


def forward(engine, batch: dict, train: TrainConfig, frozen: Frozen = Frozen(), term_scales=(1.0, 1.0)) -> dict:
    """One forward of every sequence of the batch, then the objective. Rows: B chosen, then the rejected
    ones (B for pairs; B x K, prompt-major, for listwise groups with `rejected_mask` [B, K])."""
    device = engine.device
    input_ids_NT = batch["input_ids"].to(device)
    packed = "packed_input_ids" in batch
    logits_NTV = student_logits(engine, batch, packed)
    response_mask_NT = batch["response_mask"].to(device)
    logps_N, num_tokens_N = sequence_logps(logits_NTV, input_ids_NT, response_mask_NT)
    mask_BK = batch["rejected_mask"].to(device) if "rejected_mask" in batch else None
    b = mask_BK.shape[0] if mask_BK is not None else input_ids_NT.shape[0] // 2
    side = lambda x_N: x_N[b:].view(b, -1) if mask_BK is not None else x_N[b:]  # noqa: E731 - rejected rows
    ref_N = None
    if frozen.reference is not None:  # dpo: the same sequences under the frozen initial student
        with torch.no_grad():
            ref_N = sequence_logps(student_logits(frozen.reference, batch, packed), input_ids_NT, response_mask_NT)[0]
    kd = None
    teacher = frozen.teacher
    if teacher is not None:  # token_kd: on the chosen (teacher-written) rows only
        with torch.no_grad():
            teacher_logits_BTV = teacher(
                input_ids=input_ids_NT[:b], attention_mask=batch["attention_mask"][:b].to(device)
            ).logits
        kd = token_kd_loss(logits_NTV[:b], teacher_logits_BTV, response_mask_NT[:b])
    elif "topk_ids" in batch:
        kd = topk_term(logits_NTV, batch, b, train)
    scores = {s: batch[f"{s}_score"].to(device) if f"{s}_score" in batch else None for s in ("chosen", "rejected")}
    return plad_loss(
        Sequences(logps_N[:b], num_tokens_N[:b], scores["chosen"], None if ref_N is None else ref_N[:b]),
        Sequences(side(logps_N), side(num_tokens_N), scores["rejected"], None if ref_N is None else side(ref_N)),
        train.loss,
        token_kd=kd,
        ranked_B=batch["ranked"].to(device) if "ranked" in batch else None,
        rejected_mask_BK=mask_BK,
        term_scales=term_scales,
    )


def student_logits(engine, batch: dict, packed: bool) -> torch.Tensor:
    """The student's logits [N, T, V] of the batch's padded rows: one forward of those rows, or with `packed`
    (train.packing) of the fewer packed rows, gathered back to the padded layout (plad_ray.train.packing)."""
    device = engine.device
    if not packed:
        return engine(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    packed_RTV = engine(
        input_ids=batch["packed_input_ids"].to(device),
        position_ids=batch["packed_position_ids"].to(device),
        use_cache=False,
    ).logits
    return unpack_logits(packed_RTV, batch["unpack_index"].to(device))


def student_at_teacher_topk(
    logits_NTV: torch.Tensor, topk_ids_NTk: torch.Tensor, topk_mask_NT: torch.Tensor
) -> torch.Tensor:
    """The student's log-probs of the teacher's top-k tokens at every scored position (topk_mask = 1): position
    t's top-k (collate_topk) is what the logits at t - 1 predict. [N, T-1, k], aligned with `[:, 1:]` of the
    batch; computed in fp32 chunks of the scored positions only (plad_ray.losses.topk_token_logps)."""
    return topk_token_logps(logits_NTV, topk_ids_NTk, topk_mask_NT)


def topk_term(logits_NTV: torch.Tensor, batch: dict, b: int, train: TrainConfig) -> torch.Tensor:
    """The per-token objective on the teacher's top-k: onpolicy_kd on the student's samples (rows b:),
    contrastive on both sides (plad_ray.losses)."""
    device = logits_NTV.device
    ids_NTk, teacher_NTk = batch["topk_ids"].to(device), batch["topk_logps"].to(device)[:, 1:]
    topk_mask_NT = batch["topk_mask"].to(device)
    student_NTk = student_at_teacher_topk(logits_NTV, ids_NTk, topk_mask_NT)
    mask_NT = topk_mask_NT[:, 1:]
    loss = train.loss
    if loss.objective.topk_tokens_side == "rejected":  # onpolicy_kd: the student's samples only
        return topk_divergence(student_NTk[b:], teacher_NTk[b:], mask_NT[b:], kind=loss.divergence, beta=loss.jsd_beta)
    return contrastive_topk_loss(
        student_NTk[:b],
        teacher_NTk[:b],
        mask_NT[:b],
        student_NTk[b:],
        teacher_NTk[b:],
        mask_NT[b:],
        alpha=loss.skew_alpha,
    )


# nats per token, per sequence: bf16's rounding moved the tiny student's packed log-probs by at most 0.07,
# sequences attending across a boundary by 1.5 to 4.2 (tests/unit/train/test_packing.py's batches)
PACKING_TOLERANCE = 0.25


@torch.no_grad()
def check_packing(engine, batch: dict) -> float:
    """train.packing on a model whose attention may not honour restarting position ids (a remote-code model,
    an attention kernel without packed-sequence support) would train on sequences that see each other.
    Once, on the first micro-batch: the packed and padded log-probs per token must agree."""
    device = engine.device
    input_ids_NT, response_NT = batch["input_ids"].to(device), batch["response_mask"].to(device)
    padded_NTV, packed_NTV = (student_logits(engine, batch, packed) for packed in (False, True))
    want_N, tokens_N = sequence_logps(padded_NTV, input_ids_NT, response_NT)
    gap = (
        ((sequence_logps(packed_NTV, input_ids_NT, response_NT)[0] - want_N).abs() / tokens_N.clamp(min=1)).max().item()
    )
    if gap > PACKING_TOLERANCE:
        raise ConfigError(
            f"config key train.packing: packed and padded log-probs of the first micro-batch differ by "
            f"{gap:.3g} nats per token (more than {PACKING_TOLERANCE}): this model's attention does not "
            "keep packed sequences apart; set train.packing=false"
        )
    return gap
