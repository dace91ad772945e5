"""Experiment tracking (train.trackers): TensorBoard, MLflow and W&B, one run per tracker.

Ray Train V2 leaves tracking to the training function: Ray's guide ("Experiment Tracking")
calls each library's own API on rank 0. So rank 0 opens the runs, logs the config as their
parameters and every logged step (train/..., heldout/...), and returns the run ids; the
driver reopens the same runs once the run is evaluated, for the task-quality table
(eval/<model>/<metric>) and the run's files (summary.md, loss_curve.png, report.json, run.json).

Where the trackers log, and their credentials, come only from the environment: the driver
reads the variables in ENV and hands them to rank 0 inside the plan (`Tracking.env`, left out
of its repr), so a worker on another node logs where the driver would. They are never
logged, nor written to run.json or the report.

TensorBoard writes event files: under output_dir/train/tensorboard when output_dir is a
local or shared path; when it is a URI, to a local folder that is uploaded there at every
checkpoint and at the end.
"""

import os
import shutil
import tempfile
from dataclasses import dataclass, field

from plad_ray.errors import ConfigError

TRACKERS = ("tensorboard", "mlflow", "wandb")
# The environment each tracker reads (its own variables); the driver passes these to rank 0.
ENV = {
    "mlflow": (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_INSECURE_TLS",
        "MLFLOW_TRACKING_SERVER_CERT_PATH",
        "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    ),
    "wandb": ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_ENTITY", "WANDB_BASE_URL"),
}
_PACKAGES = {"mlflow": "mlflow-skinny", "wandb": "wandb"}


@dataclass
class Tracking:
    """What rank 0 and the driver need to open the run's trackers."""

    trackers: tuple[str, ...]
    experiment: str  # MLflow experiment / W&B project
    run_name: str
    tensorboard_dir: str | None = None  # where event files are written (a local or shared folder)
    tensorboard_uri: str | None = None  # where they are uploaded to, when output_dir is a URI
    config: dict = field(default_factory=dict)  # the run's config (secrets redacted): the runs' parameters
    env: dict = field(default_factory=dict, repr=False)  # the trackers' environment (ENV), secrets included
    run_ids: dict = field(default_factory=dict)  # tracker -> run id, once rank 0 opened them

    @property
    def remote(self) -> tuple[str, ...]:
        return tuple(t for t in self.trackers if t != "tensorboard")


def check_trackers(trackers, environ=os.environ, output_dir: str = "") -> None:
    """Refuse, in one line, a tracker whose package is missing or whose environment says nowhere to log."""
    for name in trackers:
        if name == "tensorboard":
            continue
        try:
            __import__(name)
        except ImportError:
            raise ConfigError(
                f"train.trackers: {name} is listed but its package is not installed: "
                f"pip install {_PACKAGES[name]} (or pip install 'plad-ray[tracking]')"
            ) from None
    if "mlflow" in trackers and not environ.get("MLFLOW_TRACKING_URI"):
        raise ConfigError(
            "train.trackers: mlflow needs MLFLOW_TRACKING_URI in the environment, e.g. "
            "export MLFLOW_TRACKING_URI=http://<server>:5000 (credentials: MLFLOW_TRACKING_TOKEN)"
        )
    if (
        "wandb" in trackers
        and not environ.get("WANDB_API_KEY")
        and environ.get("WANDB_MODE") not in ("offline", "disabled")
    ):
        raise ConfigError(
            "train.trackers: wandb needs WANDB_API_KEY in the environment, or WANDB_MODE=offline "
            "(then `wandb sync` uploads the runs later)"
        )
    from plad_ray.data import storage

    if (
        "wandb" in trackers
        and environ.get("WANDB_MODE") == "offline"
        and storage.is_uri(output_dir)
        and not environ.get("WANDB_DIR")
    ):
        raise ConfigError(
            f"train.trackers: wandb is offline and output_dir {output_dir} is a URI, so its runs "
            "would stay in a worker's temporary folder; set WANDB_DIR to a folder rank 0 can "
            "keep (a shared mount), or log online"
        )


def plan_tracking(
    trackers,
    experiment: str,
    output_dir: str,
    run_name: str,
    config: dict | None = None,
    environ=os.environ,
    round_dir: str | None = None,
) -> Tracking:
    """The driver's half: what rank 0 opens, from the config and the driver's environment. TensorBoard goes
    under the round's train/ (`round_dir`, default output_dir), W&B's offline runs under the run's logs/."""
    from plad_ray.data import layout, storage

    check_trackers(trackers, environ, output_dir)
    folder = storage.join(round_dir or output_dir, layout.TRAIN, "tensorboard")
    plan = Tracking(trackers=tuple(trackers), experiment=experiment, run_name=run_name, config=config or {})
    if "tensorboard" in trackers:
        if storage.is_uri(output_dir):
            plan.tensorboard_uri = folder
        else:
            plan.tensorboard_dir = folder
    for name in plan.remote:
        plan.env.update({key: environ[key] for key in ENV[name] if key in environ})
    if "wandb" in trackers and "WANDB_DIR" not in plan.env and not storage.is_uri(output_dir):
        plan.env["WANDB_DIR"] = storage.join(output_dir, layout.LOGS)  # offline runs beside the run's logs
    return plan


def flat_params(config: dict, prefix: str = "") -> dict:
    """A nested config as dotted keys -> values (MLflow parameters are flat)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def evaluation_metrics(evaluation: dict) -> dict:
    """The task-quality table as metrics: eval/<model>/<metric> (win rates by their rate)."""
    out = {}
    for model, figures in (evaluation or {}).get("models", {}).items():
        slug = model.split(" (")[0].replace(" ", "_")
        for key, value in figures.items():
            value = value.get("win_rate") if isinstance(value, dict) else value
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                out[f"eval/{slug}/{key}"] = float(value)
    return out


class Tracker:
    """The open runs of one process: rank 0 while training, the driver after evaluation."""

    def __init__(self, plan: Tracking | None, params: dict | None = None):
        self.plan, self.tb, self.mlflow, self.wandb, self.local_tb = plan, None, None, None, None
        if plan is None:
            return
        os.environ.update(plan.env)
        if "tensorboard" in plan.trackers and params is not None:  # rank 0 only: the driver adds no scalars
            from tensorboardX import SummaryWriter

            folder = plan.tensorboard_dir
            if folder is None:
                folder = self.local_tb = tempfile.mkdtemp(prefix="plad-ray-tensorboard-")
            os.makedirs(folder, exist_ok=True)
            self.tb = SummaryWriter(folder)
        if "mlflow" in plan.trackers:
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # log_report says where, once
            import mlflow

            mlflow.set_experiment(plan.experiment)
            self.mlflow = mlflow.start_run(
                run_id=plan.run_ids.get("mlflow"), run_name=None if "mlflow" in plan.run_ids else plan.run_name
            )
            plan.run_ids["mlflow"] = self.mlflow.info.run_id
            if params:
                flat = {k: str(v)[:6000] for k, v in flat_params(params).items()}
                items = sorted(flat.items())
                for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters per call
                    mlflow.log_params(dict(items[start : start + 100]))
        if "wandb" in plan.trackers:
            # W&B prints its own notes on the terminal (integrations it detected, file symlinks) unless silent;
            # the run's id and folder are in plad-ray's own lines.
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb = wandb.init(
                project=plan.experiment,
                name=plan.run_name,
                id=plan.run_ids.get("wandb"),
                resume="allow",
                config=params,
                dir=os.environ.get("WANDB_DIR"),
                settings=wandb.Settings(silent=True, console="off"),
            )
            plan.run_ids["wandb"] = self.wandb.id

    def log(self, step: int, values: dict, prefix: str = "train") -> None:
        scalars = {
            f"{prefix}/{k}": float(v)
            for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch")
        }
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.mlflow is not None:
            import mlflow

            mlflow.log_metrics(scalars, step=step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def log_final(self, metrics: dict, files: list[str]) -> None:
        """The driver's half: the evaluation table and the run's files, into the runs rank 0 opened."""
        existing = [path for path in files if path and os.path.exists(path)]
        if self.mlflow is not None:
            import mlflow

            if metrics:
                mlflow.log_metrics(metrics)
            for path in existing:
                mlflow.log_artifact(path)
        if self.wandb is not None:
            self.wandb.summary.update(metrics)
            for path in existing:
                self.wandb.save(path, base_path=os.path.dirname(path), policy="now")

    def where(self) -> list[str]:
        """Each open run, for people: its id and where to look."""
        out = []
        if self.mlflow is not None:
            import mlflow

            uri, run = mlflow.get_tracking_uri(), self.mlflow.info
            link = (
                f"{uri.rstrip('/')}/#/experiments/{run.experiment_id}/runs/{run.run_id}"
                if uri.startswith("http")
                else uri
            )
            out.append(f"mlflow run {run.run_id} ({link})")
        if self.wandb is not None:
            offline = self.wandb.settings.mode == "offline"
            out.append(
                f"wandb run {self.wandb.id} ("
                + (f"offline: wandb sync {os.path.dirname(self.wandb.dir)}" if offline else self.wandb.url)
                + ")"
            )
        return out

    def sync(self) -> None:
        """Upload TensorBoard's local event files when output_dir is a URI (at checkpoints and at the end)."""
        if self.local_tb is not None:
            from plad_ray.data import storage

            self.tb.flush()
            storage.copy_local_dir(self.local_tb, self.plan.tensorboard_uri)

    def close(self) -> dict:
        """End the runs (the ids stay in the plan); returns tracker -> run id."""
        if self.tb is not None:
            self.sync()
            self.tb.close()
            if self.local_tb is not None:
                shutil.rmtree(self.local_tb, ignore_errors=True)
        if self.mlflow is not None:
            import mlflow

            mlflow.end_run()
        if self.wandb is not None:
            self.wandb.finish()
        return dict(self.plan.run_ids) if self.plan is not None else {}


def log_report(cfg, report: dict, log=print) -> None:
    """After the run's report is written: its task-quality table and files go into the runs training opened."""
    from plad_ray.data import storage
    from plad_ray.data.layout import RUN_FILE

    runs = report.get("tracker_runs") or {}
    remote = [name for name in cfg.train.trackers if name in runs]
    if not remote:
        return
    layout = cfg.layout()
    plan = plan_tracking(remote, cfg.train.experiment, storage.absolute(cfg.output_dir), "")
    plan.run_ids.update(runs)
    with tempfile.TemporaryDirectory(prefix="plad-ray-report-") as tmp:
        files = [
            _local_copy(uri, tmp)
            for uri in (layout.summary(), layout.loss_curve(), layout.report(), storage.join(cfg.output_dir, RUN_FILE))
        ]
        tracker = Tracker(plan)
        tracker.log_final(evaluation_metrics(report.get("evaluation")), files)
        where = tracker.where()
        tracker.close()
    log("[plad-ray] evaluation and summary logged to " + ", ".join(where))


def _local_copy(uri: str, folder: str) -> str | None:
    """A local path of the file at `uri` (itself when local; downloaded into `folder` otherwise)."""
    from plad_ray.data import storage

    if not storage.exists(uri):
        return None
    if not storage.is_uri(uri):
        return storage.absolute(uri)
    fs, path = storage.filesystem_and_path(uri)
    target = os.path.join(folder, os.path.basename(path))
    with fs.open_input_stream(path) as source, open(target, "wb") as out:
        out.write(source.read())
    return target
