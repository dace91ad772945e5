"""A worker's checkpoints: DeepSpeed's state plus `Progress`, reported to Ray Train as <root>/step-<N>.

Ray Train restarts failed workers from the newest checkpoint (`resume`); the collapse guard
(plad_ray.train.heldout) loads an older one by its step.

`save` writes DeepSpeed's state to a local folder and hands it to Ray Train, which copies it to
the run's storage (`<output_dir>/train`) and deletes the local copy. With train.checkpoint_upload
= async (Ray Train's CheckpointUploadMode.ASYNC) the copy runs in a background thread while the
ranks train on; uploads are reported in order, and the last one is flushed when the training
function returns. Each save's stall (seconds the ranks waited) is kept in `Progress.checkpoint_s`.
"""

import json
import os
import tempfile
import time
from contextlib import ExitStack, contextmanager
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
    checkpoint_s: list = field(default_factory=list)  # [step, seconds training waited] of each save
    tracker_runs: dict = field(default_factory=dict)  # tracker -> run id: a restarted rank 0 logs to the same runs


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def resume(engine) -> Progress:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Progress()
    with local_copy(checkpoint) as folder:
        engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
        progress = Progress(**json.loads((Path(folder) / PROGRESS_FILE).read_text()))
    print(f"[train] resumed from checkpoint at step {progress.step}", flush=True)
    return progress


# Ray's message when the node's shared download folder of a checkpoint in storage vanished while this rank waited for
# its lock: another rank of the node had finished with it and was deleting it under the same lock (Ray's cleanup
# race; seen once in the two-node resume from S3, 2026-12-07).
_RAY_CLEANUP_RACE = "even though it should have been created by another process"


@contextmanager
def local_copy(checkpoint):
    """checkpoint.as_directory(), asked once more when Ray's cleanup race took the folder away: the second call
    finds no folder and downloads it itself."""
    stack = ExitStack()
    try:
        folder = stack.enter_context(checkpoint.as_directory())
    except RuntimeError as e:
        if _RAY_CLEANUP_RACE not in str(e):
            raise
        print(
            "[train] another rank removed the checkpoint's download folder as this one came to it; downloading again",
            flush=True,
        )
        folder = stack.enter_context(checkpoint.as_directory())
    with stack:
        yield folder


def save(engine, progress: Progress, rank: int, upload: str = "sync", staging: str | None = None) -> None:
    """Checkpoint the engine and `progress` as <root>/step-<N>; `upload`: async | sync (train.checkpoint_upload);
    `staging`: the local folder it is written to first (train.checkpoint_staging_dir; None: the temp folder)."""
    import ray.train

    start = time.perf_counter()
    progress.last_checkpoint = progress.step
    folder = staging_folder(staging)  # Ray Train deletes it once uploaded
    engine.save_checkpoint(folder, tag=CHECKPOINT_TAG)
    if rank == 0:
        (Path(folder) / PROGRESS_FILE).write_text(json.dumps(progress.__dict__))
    mode = ray.train.CheckpointUploadMode.ASYNC if upload == "async" else ray.train.CheckpointUploadMode.SYNC
    ray.train.report(
        {"step": progress.step, **(progress.curve[-1] if progress.curve else {})},
        checkpoint=ray.train.Checkpoint.from_directory(folder),
        checkpoint_dir_name=checkpoint_name(progress.step),
        checkpoint_upload_mode=mode,
        delete_local_checkpoint_after_upload=True,
    )
    progress.checkpoint_s.append([progress.step, time.perf_counter() - start])


def staging_folder(staging: str | None) -> str:
    """A new folder for one checkpoint under `staging` (created if missing; None: the system's temp folder)."""
    if staging is not None:
        os.makedirs(staging, exist_ok=True)
    return tempfile.mkdtemp(prefix="plad-ray-checkpoint-", dir=staging)
