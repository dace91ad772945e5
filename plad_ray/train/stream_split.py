"""How Ray Train hands the pair stream (train.stream) to the ranks: one streaming split per rank, blocks
going to whichever rank asks next.

Ray Train's own DataConfig splits with `equal=True`: every rank gets the same number of rows of the whole
stream. The stream's first rows are the held-out pairs, and however they fall, equal totals then leave the
ranks with unequal numbers of *training* pairs (measured on the demo: 208 of 1,744 pairs left over when
the first rank ran out). Without `equal`, the ranks, which train in lock-step, take training blocks at
the same pace; what is still uneven at the end is trained with zero-weight spare steps
(plad_ray.train.worker). Only `configure` differs from Ray Train's DataConfig.

No `locality_hints`: with them, Ray Data prefers to hand a rank the blocks made on its own node, and by its
own documentation keeps no order across nodes then; a rank could get a held-out block after a training one.
"""

import ray.train


class StreamSplit(ray.train.DataConfig):
    """Ray Train's DataConfig with `stream` split without `equal`, in the stream's order."""

    def __init__(self, stream: str, execution_options):
        super().__init__(datasets_to_split=[], execution_options=execution_options)
        self.stream = stream

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = super().configure(
            {k: v for k, v in datasets.items() if k != self.stream},
            world_size,
            worker_handles,
            worker_node_ids,
            **kwargs,
        )
        ds = datasets[self.stream]
        ds = ds.copy(ds)
        ds.context.execution_options = self._resolve_execution_options(self.stream)
        for rank, split in enumerate(ds.streaming_split(world_size, equal=False)):
            output[rank][self.stream] = split
        return output
