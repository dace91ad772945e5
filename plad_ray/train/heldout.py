"""Held-out evaluation and the collapse guard.

The held-out pairs are scored before training, every train.eval_every_steps and after it:
ranking accuracy, ranking loss (`loss`) and margin, the trained objective (`objective`: for the
token-level objectives, not the ranking loss they only report), and the student's log-prob per
token of the held-out teacher outputs. That log-prob is what a ranking loss can quietly destroy. Each rank scores
its own share (the driver's split, `TrainPlan.eval_shard`) and the sums are all-reduced, so
every rank holds the figures of all the pairs and N ranks do 1/N of the work each.

The collapse guard (`train.guard`) watches it. A ranking loss can win the ranking by making
both outputs less likely; when that log-prob falls more than `max_logp_drop` below its value
before training, rank 0 says so in one line, the report records it, and with `action: stop`
training ends at the last checkpoint that passed.
"""

from typing import Callable

import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from plad_ray.train.batching import collate_pairs
from plad_ray.train.checkpoints import CHECKPOINT_TAG, Progress, checkpoint_name, local_copy
from plad_ray.train.feed import Frozen, forward, term_counts
from plad_ray.train.plan import TrainPlan


class _Collate(NumpyBatchCollateFn):
    """collate_pairs as the callable class Ray Data's iter_torch_batches expects."""

    def __init__(self, pad_id: int):
        super().__init__()
        self.pad_id = pad_id

    def __call__(self, batch: dict) -> dict:
        return collate_pairs(batch, self.pad_id)


def load_batches(shard, plan: TrainPlan) -> list[dict]:
    """The held-out pairs as batches, read once and kept: they are scored every eval_every_steps."""
    return list(shard.iter_torch_batches(batch_size=plan.train.micro_batch_size, collate_fn=_Collate(plan.pad_id)))


@torch.no_grad()
def evaluate(engine, batches: list[dict], plan: TrainPlan, frozen: Frozen = Frozen(), reduce: bool = True) -> dict:
    """Held-out pairs: ranking accuracy, loss and margin over the pairs with a ranking signal, and the
    student's per-token NLL (= -log-prob) of every held-out teacher output.

    `batches` are this rank's share; with `reduce` (and a process group) the sums are all-reduced over
    the ranks, which then all hold the same figures. Under ZeRO-3 every forward is a collective (the
    parameters are gathered), so a rank with fewer batches than another runs empty forwards to match.
    """
    engine.eval()
    # pairs, ranked, correct, loss, margin sums, chosen NLL, tokens, objective sum, its count
    totals_9 = torch.zeros(9, dtype=torch.float64)
    per_token = plan.train.loss.objective.per_token  # objective: a mean over tokens, not pairs
    for batch in batches:
        stats = forward(engine, batch, plan.train, frozen)
        n = batch["input_ids"].shape[0] // 2
        ranked = batch["ranked"].sum().item()
        chosen_tokens = batch["response_mask"][:n, 1:].sum().item()
        count = term_counts(batch, plan.train)[1 if per_token else 0]
        totals_9 += torch.tensor(
            [
                n,
                ranked,
                stats["accuracy"] * ranked,
                stats["rank_loss"] * ranked,
                stats["margin"] * ranked,
                stats["nll"] * chosen_tokens,
                chosen_tokens,
                float(stats["loss"]) * count,
                count,
            ],
            dtype=torch.float64,
        )
    if reduce and torch.distributed.is_initialized():
        if plan.train.zero_stage == 3:
            _match_forwards(engine, len(batches), plan.pad_id)
        torch.distributed.all_reduce(totals_9)
    engine.train()
    ranked = max(totals_9[1].item(), 1.0)
    nll = totals_9[5].item() / max(totals_9[6].item(), 1.0)
    return {
        "pairs": int(totals_9[0].item()),
        "ranked_pairs": int(totals_9[1].item()),
        "ranking_accuracy": totals_9[2].item() / ranked,
        "loss": totals_9[3].item() / ranked,
        "margin": totals_9[4].item() / ranked,
        "objective": totals_9[7].item() / max(totals_9[8].item(), 1.0),
        "chosen_nll_per_token": nll,
        "teacher_logp_per_token": -nll,
    }


def _match_forwards(engine, forwards: int, pad_id: int) -> None:
    """Run one-token forwards until this rank has run as many as the rank with the most batches."""
    most = torch.tensor([forwards], dtype=torch.int64)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    for _ in range(int(most.item()) - forwards):
        engine(input_ids=torch.full((1, 1), pad_id, dtype=torch.long, device=engine.device))


def check_guard(engine, plan: TrainPlan, progress: Progress, figures: dict, log: Callable[[str], None]) -> bool:
    """True when the held-out teacher-output log-prob fell past train.guard.max_logp_drop (ranks agree).

    Warns once (`log`: rank 0's log line); in stop mode restores the newest (last good) checkpoint and
    records where training ended.
    """
    guard = plan.train.guard
    initial = -progress.eval_initial["chosen_nll_per_token"]
    drop = initial - figures["teacher_logp_per_token"]
    tripped = guard.max_logp_drop is not None and figures["pairs"] > 0 and drop > guard.max_logp_drop
    if torch.distributed.is_initialized():  # the figures are all-reduced; decide as one all the same
        flag = torch.tensor([float(tripped)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        tripped = bool(flag.item())
    if not tripped:
        return False
    if progress.guard is None:
        progress.guard = {
            "step": progress.step,
            "initial_logp_per_token": initial,
            "logp_per_token": figures["teacher_logp_per_token"],
            "max_logp_drop": guard.max_logp_drop,
            "action": guard.action,
        }
        log(
            f"[train] warning: held-out teacher-output log-prob per token fell {drop:.3f} nats "
            f"({initial:.3f} -> {figures['teacher_logp_per_token']:.3f}) by step {progress.step}, more than "
            f"train.guard.max_logp_drop={guard.max_logp_drop}: the student is getting less likely to write what "
            f"the teacher writes"
            + (
                "; stopping at the last good checkpoint"
                if guard.action == "stop"
                else "; set train.guard.action=stop to end training at the last good checkpoint"
            )
        )
    if guard.action == "stop":
        good = progress.last_checkpoint
        _restore(engine, plan, good)
        progress.guard.update(stopped_at_step=progress.step, restored_step=good)
        log(f"[train] restored the checkpoint of step {good}; training stops there")
    return True


def _restore(engine, plan: TrainPlan, step: int) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint(f"{plan.checkpoint_root}/{checkpoint_name(step)}")
    with local_copy(checkpoint) as folder:
        engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
