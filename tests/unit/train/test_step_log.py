"""The training log's time figures: `data_s` (waiting for batches) and `cpu_s` (the rank's own CPU seconds)."""

import time

import torch

from plad_ray.train.step_log import Window, waited


def _slow_batches(n: int, wait: float):
    for i in range(n):
        time.sleep(wait)  # a feed that is not ready: no CPU used, only waited for
        yield i


def test_the_wait_for_each_steps_batches_is_counted_apart_from_the_step():
    window = Window()
    for _ in waited(_slow_batches(3, 0.05), window):
        time.sleep(0.1)  # the step itself: not waiting for data
    entry = window.flush(step=3, epoch=0, lr=0.0)
    assert 0.15 <= entry["data_s"] < 0.25, entry  # three waits of 0.05 s, not the steps' 0.3 s
    assert entry["seconds"] >= 0.45
    assert entry["cpu_s"] < 0.1  # sleeping uses no CPU
    assert window.data_seconds == 0.0  # the next window starts from zero


def test_cpu_seconds_are_the_process_own_work():
    window = Window()
    x = torch.randn(256, 256)
    deadline = time.perf_counter() + 0.3
    while time.perf_counter() < deadline:
        x = (x @ x).tanh()
    entry = window.flush(step=1, epoch=0, lr=0.0)
    assert entry["cpu_s"] >= 0.2 and entry["data_s"] == 0.0, entry
