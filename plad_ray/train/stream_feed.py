"""A rank's share of the pair stream (train.stream): held-out pairs first, then the pairs it trains on.

With train.stream the student engines' pairs reach the ranks as they are made (plad_ray.train.driver,
`stream_dataset`): one Ray Data stream, split across the ranks by Ray Train, in the stream's order, with
the held-out prompts' pairs first. Each rank reads its share once:

    stream --held-out rows (until the first training row)--> held-out batches (scored before training)
           --training rows--> the rows `micro_batches` cuts into steps, like a fixed shard's

Rows the objective does not train on (too long, identical without an NLL part, dropped by the scorer)
are counted, as the sequential driver counts them (`prepare.prepare_pairs`), and left out. Ranks may get
different numbers of training rows: while any rank has a step, `any_rank` keeps the others stepping with
zero-weight spare steps (plad_ray.train.worker), and `finish` sums the counts over the ranks.
"""

from collections import Counter

import numpy as np
import torch

from plad_ray.train.batching import collate_pairs
from plad_ray.train.feed import optimizer_steps
from plad_ray.train.step_log import waited

HELDOUT_STATUSES = ("ok", "identical")
COUNTED_STATUSES = ("identical", "too_long", "student_better")
OUT_OF_ORDER = (
    "train.stream: a held-out pair came after a training pair; the stream lost its order (Ray Data's preserve_order)"
)


def classify(batch: dict, trained: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(held-out mask, training mask) of a tokenized batch; a row in neither is not used."""
    status, heldout = batch["status"], np.asarray(batch["heldout"], dtype=bool)
    return heldout & np.isin(status, HELDOUT_STATUSES), ~heldout & np.isin(status, trained)


def count_rows(batch: dict, trained: tuple[str, ...], scorer: bool) -> Counter:
    """The counts `prepare.prepare_pairs` reports, for one tokenized batch."""
    heldout_rows, train_rows = classify(batch, trained)
    status = batch["status"]
    counts = Counter(
        pairs=len(status),
        train=int(train_rows.sum()),
        heldout=int(heldout_rows.sum()),
        heldout_ranked=int((heldout_rows & (status == "ok")).sum()),
    )
    for name in COUNTED_STATUSES:
        counts[f"dropped_{name}"] = 0 if name == "identical" and "identical" in trained else int((status == name).sum())
    if scorer:
        verdicts = batch["verdict"]
        counts.update(
            teacher_wins=int((verdicts == "teacher").sum()),
            ties=int((verdicts == "tie").sum()),
            student_wins=int((verdicts == "student").sum()),
        )
    return counts


def take(batch: dict, mask: np.ndarray) -> dict:
    return {k: v[mask] for k, v in batch.items()}


def concat(batches: list[dict]) -> dict:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]} if batches else {}


def rows_of(batch: dict) -> int:
    return len(next(iter(batch.values()))) if batch else 0


class StreamFeed:
    """One rank's pass over its split of the stream (a Ray Train DataIterator of tokenized pair rows): a feed of
    plad_ray.train.feeds, one epoch whatever its length, with no checkpoint inside it."""

    single_pass = True

    def __init__(
        self,
        shard,
        trained: tuple[str, ...],
        scorer: bool = False,
        read_rows: int = 16,
        micro_batch_size: int = 16,
        pad_id: int = 0,
    ):
        # read a step's rows at a time: the ranks take blocks from the stream at the pace they train
        self.batches = iter(shard.iter_batches(batch_size=read_rows, batch_format="numpy"))
        self.trained, self.scorer = trained, scorer
        self.counts = Counter()
        self.first_training: dict = {}  # training rows of the batch that ended the held-out part
        self.read_heldout = False
        self.micro_batch_size, self.pad_id = micro_batch_size, pad_id  # of the held-out batches

    def _next(self) -> dict | None:
        batch = next(self.batches, None)
        if batch is not None:
            self.counts.update(count_rows(batch, self.trained, self.scorer))
        return batch

    def heldout(self) -> list[dict]:
        """This rank's held-out pairs, collated: every row before the first training row (the stream puts
        the held-out prompts first)."""
        rows = []
        while True:
            batch = self._next()
            if batch is None:
                break
            heldout_rows, train_rows = classify(batch, self.trained)
            rows.append(take(batch, heldout_rows))
            if train_rows.any():
                self.first_training = take(batch, train_rows)
                if heldout_rows[np.argmax(train_rows) :].any():
                    raise RuntimeError(OUT_OF_ORDER)
                break
        self.read_heldout = True
        held = concat([r for r in rows if rows_of(r)])
        n = rows_of(held)
        size = self.micro_batch_size
        return [collate_pairs({k: v[i : i + size] for k, v in held.items()}, self.pad_id) for i in range(0, n, size)]

    def _training_rows(self):
        if rows_of(self.first_training):
            yield self.first_training
            self.first_training = {}
        while (batch := self._next()) is not None:
            heldout_rows, train_rows = classify(batch, self.trained)
            if heldout_rows.any():
                raise RuntimeError(OUT_OF_ORDER)
            yield take(batch, train_rows)

    def iter_batches(self, batch_size: int, batch_format: str = "numpy"):
        """The training rows in batches of `batch_size` (the last may be short), like a Ray Data shard's."""
        assert self.read_heldout and batch_format == "numpy"
        held: list[dict] = []
        size = 0
        for rows in self._training_rows():
            while rows_of(rows):
                cut = batch_size - size
                held.append({k: v[:cut] for k, v in rows.items()})
                size += rows_of(held[-1])
                rows = {k: v[cut:] for k, v in rows.items()}
                if size == batch_size:
                    yield concat(held)
                    held, size = [], 0
        if size:
            yield concat(held)

    def steps(self, train, pad_id: int, epoch: int, window):
        """(micro-batches, spare) per optimizer step while any rank has a step (`joined`)."""
        return joined(waited(optimizer_steps(self, train, pad_id, epoch), window))

    def finish(self, trained_rows: int) -> dict:
        """Read the rest of this rank's split (the stream writes every pair before a rank reads it, so this
        only empties the split), then the counts summed over the ranks (every rank calls it), with
        `trained` (rows trained on) and `untrained` (training rows not trained: past the planned steps, where
        training ends whatever the stream still brings, or short of a whole step at a rank's end)."""
        for _ in iter(self._next, None):
            pass
        self.counts["trained"] = trained_rows
        keys = sorted(self.counts)
        totals = torch.tensor([self.counts[k] for k in keys], dtype=torch.float64)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        counts = {k: int(v) for k, v in zip(keys, totals.tolist())}
        counts["untrained"] = counts["train"] - counts["trained"]
        return counts


def joined(steps):
    """(step, spare) while any rank has a step. The ranks' splits of the stream may hold different numbers of
    pairs; a rank out of them runs its last step's micro-batches again with zero weight (their term counts are
    0: the training loop's `spare`), so every rank makes the same DeepSpeed steps while the others' gradients
    are exactly theirs (`any_rank`)."""
    last = None
    for step in steps:
        any_rank(True)
        last = step
        yield step, False
    while any_rank(False):
        if last is None:
            raise RuntimeError(
                "train.stream: a rank got no training pairs from the stream while another did; "
                "lower train.num_workers or add prompts"
            )
        yield last, True


def any_rank(has_step: bool) -> bool:
    """Whether any rank has another optimizer step (ranks of a stream may hold different numbers of pairs;
    DeepSpeed's collectives need the same steps on all of them). Every rank calls it once per step."""
    if not torch.distributed.is_initialized():
        return has_step
    flag = torch.tensor([1.0 if has_step else 0.0])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())
