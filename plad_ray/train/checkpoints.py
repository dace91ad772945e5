"""A worker's checkpoints: DeepSpeed's state plus `Progress`, reported to Ray Train as <root>/step-<N>.

Ray Train restarts failed workers from the newest checkpoint (`resume`); the collapse guard
(plad_ray.train.heldout) loads an older one by its step.
"""

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

PROGRESS_FILE = "plad_progress.json"
CHECKPOINT_TAG = "state"


@dataclass
class Progress:
    """What a checkpoint remembers beyond DeepSpeed's own state."""

    step: int = 0
    curve: list = field(default_factory=list)  # one entry per logged step
    eval_initial: dict | None = None
    evals: list = field(default_factory=list)  # held-out figures every train.eval_every_steps: {step, ...}
    guard: dict | None = None  # set when the collapse guard tripped: step, log-probs, what was done
    last_checkpoint: int | None = None  # step of the newest checkpoint of this run


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def resume(engine) -> Progress:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Progress()
    with checkpoint.as_directory() as folder:
        engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
        progress = Progress(**json.loads((Path(folder) / PROGRESS_FILE).read_text()))
    print(f"[train] resumed from checkpoint at step {progress.step}", flush=True)
    return progress


def save(engine, progress: Progress, rank: int) -> None:
    import ray.train

    progress.last_checkpoint = progress.step
    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag=CHECKPOINT_TAG)
        if rank == 0:
            (Path(folder) / PROGRESS_FILE).write_text(json.dumps(progress.__dict__))
        ray.train.report(
            {"step": progress.step, **(progress.curve[-1] if progress.curve else {})},
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=checkpoint_name(progress.step),
        )
