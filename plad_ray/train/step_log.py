"""The training log's figures between two logged steps: running means of the objective's terms, real
(non-padding) tokens/s, padding share, the seconds spent waiting for batches and the process's CPU seconds.
The training loop (plad_ray.train.worker) adds each micro-batch and flushes one entry per logged step."""

import time


def waited(steps, window: "Window"):
    """The steps, the time spent waiting for each one's batches (Ray Data's read of the shard, collating,
    packing) added to the window's `data_s`: the share of a step the model did not run."""
    steps = iter(steps)
    while True:
        start = time.perf_counter()
        step = next(steps, None)
        if step is None:
            return
        window.data_seconds += time.perf_counter() - start
        yield step


class Window:
    """Running means between two logged steps, real (non-padding) token throughput, the seconds spent
    waiting for batches (`data_s`) and the CPU seconds this rank's process used (`cpu_s`, all its threads: on
    a CPU-only node, `cpu_s / seconds` below its CPUs is time other processes took from it)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0
        self.data_seconds = 0.0
        self.tokens = 0  # real (non-padding) tokens through forward and backward
        self.padded = 0
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()

    def add(self, stats: dict, batch: dict) -> None:
        for key in ("loss", "rank_loss", "nll", "accuracy", "margin"):
            self.sums[key] = self.sums.get(key, 0.0) + float(stats[key])
        self.count += 1
        self.tokens += int(batch["attention_mask"].sum())
        self.padded += (batch["packed_input_ids"] if "packed_input_ids" in batch else batch["attention_mask"]).numel()

    def flush(self, step: int, epoch: int, lr: float) -> dict:
        seconds = time.perf_counter() - self.start
        entry = {
            "step": step,
            "epoch": epoch,
            "lr": lr,
            **{k: v / self.count for k, v in self.sums.items()},
            "tokens": self.tokens,
            "seconds": seconds,
            "tokens_per_s": self.tokens / seconds if seconds else 0.0,
            "padding": 1 - self.tokens / self.padded if self.padded else 0.0,
            "data_s": self.data_seconds,
            "cpu_s": time.process_time() - self.cpu_start,
        }
        self.__init__()
        return entry
