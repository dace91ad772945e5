"""Training metrics for TensorBoard, written by rank 0 (tensorboardX event files).

Ray Train (v2) leaves experiment tracking to the training function; TensorBoard files
need no server and open anywhere: `tensorboard --logdir <output_dir>/train/tensorboard`.
"""

import os

from plad_ray.data import layout, storage


class MetricsWriter:
    def __init__(self, folder: str | None):
        self.writer = None
        if folder is not None:
            from tensorboardX import SummaryWriter

            os.makedirs(folder, exist_ok=True)
            self.writer = SummaryWriter(folder)

    def log(self, step: int, values: dict, prefix: str = "train") -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def tensorboard_dir(output_dir: str, enabled: bool) -> str | None:
    """Local (or shared-filesystem) folder for event files; None when off or output_dir is a URI."""
    if not enabled or storage.is_uri(output_dir):
        return None
    return os.path.join(output_dir, layout.TRAIN, "tensorboard")
