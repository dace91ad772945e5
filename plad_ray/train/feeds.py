"""What a rank trains on, as one interface with two kinds; the training loop never asks which it has.

    FixedFeed   the driver's fixed split of the pairs on disk (Ray Train datasets `train_<rank>`,
                `eval_<rank>`): every epoch reads it again, in the same order; checkpoints as configured.
    StreamFeed  train.stream (plad_ray.train.stream_feed): the student engines' pairs as they are made, held-out
                ones first; one pass, no checkpoint inside it, ranks kept in step by spare steps.

A feed gives `heldout()` (this rank's held-out batches, scored before, during and after training),
`steps(train, pad_id, epoch, window)` ((micro-batches, spare) per optimizer step), `single_pass` (the feed
is one epoch, whatever its length, and takes no checkpoint) and `finish(trained_rows)` (its counts, or None).
"""

from plad_ray.train.feed import optimizer_steps
from plad_ray.train.heldout import load_batches
from plad_ray.train.plan import TrainPlan
from plad_ray.train.step_log import waited
from plad_ray.train.stream_feed import StreamFeed


class FixedFeed:
    single_pass = False

    def __init__(self, rows, heldout_batches):
        self.rows = rows  # this rank's training rows: a Ray Data shard (iter_batches)
        self._heldout = heldout_batches  # a callable: the held-out batches, read when first asked

    def heldout(self) -> list[dict]:
        return self._heldout()

    def steps(self, train, pad_id: int, epoch: int, window):
        return ((step, False) for step in waited(optimizer_steps(self.rows, train, pad_id, epoch), window))

    def finish(self, trained_rows: int) -> None:
        return None


def open_feed(plan: TrainPlan, rank: int):
    """This rank's feed, from the Ray Train datasets the driver gave the worker group."""
    import ray.train

    train = plan.train
    if plan.stream:  # held-out pairs come first in the stream: `heldout()` waits for them
        return StreamFeed(
            ray.train.get_dataset_shard(TrainPlan.STREAM),
            plan.trained_statuses,
            scorer=train.scorer is not None,
            read_rows=train.micro_batch_size * train.gradient_accumulation_steps,
            micro_batch_size=train.micro_batch_size,
            pad_id=plan.pad_id,
        )
    return FixedFeed(
        ray.train.get_dataset_shard(TrainPlan.train_shard(rank)),
        lambda: load_batches(ray.train.get_dataset_shard(TrainPlan.eval_shard(rank)), plan),
    )
