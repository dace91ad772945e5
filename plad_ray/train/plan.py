"""What every training rank is given: the driver builds one TrainPlan (plad_ray.train.driver), Ray Train hands it
to each worker (plad_ray.train.worker), and the held-out scoring reads it (plad_ray.train.heldout)."""

from dataclasses import dataclass

from plad_ray.config import TrainConfig
from plad_ray.data import storage
from plad_ray.data.layout import TRAIN
from plad_ray.tracking import Tracking


@dataclass
class TrainPlan:
    """Everything a worker needs, computed by the driver."""

    train: TrainConfig
    model_path: str
    export_uri: str  # where rank 0 publishes the trained model (HF folder)
    tracking: Tracking | None  # the experiment trackers rank 0 logs to (plad_ray.tracking); None: none
    pad_id: int
    # optimizer steps per epoch (identical on every worker): counted from the pairs by driver.run_training
    steps_per_epoch: int = 0
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load .bin weights (student.allow_pickle_weights); else safetensors only
    teacher_path: str | None = None  # token_kd only: the teacher, frozen, for its token distributions
    run_dir: str = ""  # the round's output folder (absolute): Ray Train's storage path, its checkpoints in train/
    trace_pairs_dir: str | None = None  # test hook ($PLAD_RAY_TRACE_PAIRS): each rank logs the pair keys of every step
    # train.stream: the ranks read the pair stream (`STREAM`, plad_ray.train.stream_feed) instead of fixed shards;
    # steps_per_epoch is then planned from the pairs expected (the stream may end sooner)
    stream: bool = False
    trained_statuses: tuple[str, ...] = ("ok",)  # pair statuses the objective trains on (prepare.prepare_pairs)
    # the epochs after a streamed one: its steps (the first epoch's length; steps_per_epoch is the others')
    first_epoch_steps: int | None = None
    export: bool = True  # False: a streamed first epoch of several ends with a checkpoint, not an export

    STREAM = "stream"  # the Ray Train dataset of train.stream, split across the ranks by Ray Train

    @staticmethod
    def train_shard(rank: int) -> str:
        """The Ray Train dataset that holds this rank's fixed split of the training pairs."""
        return f"train_{rank}"

    @staticmethod
    def eval_shard(rank: int) -> str:
        """The Ray Train dataset that holds this rank's share of the held-out pairs (`heldout.evaluate`)."""
        return f"eval_{rank}"

    @property
    def checkpoint_root(self) -> str:
        """Where Ray Train persists this run's checkpoints (<run_dir>/train)."""
        return storage.join(self.run_dir, TRAIN)

    @property
    def total_steps(self) -> int:
        if self.first_epoch_steps is None:
            steps = self.steps_per_epoch * self.train.num_epochs
        else:
            steps = self.first_epoch_steps + self.steps_per_epoch * (self.train.num_epochs - 1)
        return steps if self.train.max_steps is None else min(steps, self.train.max_steps)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, steps done in it) after `step` optimizer steps."""
        if self.first_epoch_steps is None:
            return step // self.steps_per_epoch, step % self.steps_per_epoch
        if step < self.first_epoch_steps:
            return 0, step
        after = step - self.first_epoch_steps
        return 1 + after // self.steps_per_epoch, after % self.steps_per_epoch
