"""Experiment trackers (plad_ray.tracking): refusals, and real logging to an MLflow server and W&B offline.

The whole pipeline logging to all three runs in tests/integration/test_pipeline_e2e.py; here the tracker
calls themselves, in seconds.
"""

import glob
import time

import pytest
from support.trackers import SECRET_KEY, SECRET_TOKEN, wandb_history, wandb_summaries

from plad_ray.config import load_config
from plad_ray.errors import ConfigError
from plad_ray.tracking import Tracker, check_trackers, evaluation_metrics, plan_tracking


def test_config_refuses_unknown_and_repeated_trackers():
    with pytest.raises(ConfigError, match=r"train.trackers: unknown tracker 'neptune'; choose from: tensorboard"):
        load_config("configs/tiny-cpu.yaml", ["train.trackers=[mlflow, neptune]"])
    with pytest.raises(ConfigError, match="train.trackers: lists a tracker twice"):
        load_config("configs/tiny-cpu.yaml", ["train.trackers=[wandb, wandb]"])
    with pytest.raises(ConfigError, match=r"train.trackers: expected a list of strings"):
        load_config("configs/tiny-cpu.yaml", ["train.trackers=mlflow"])
    assert load_config("configs/tiny-cpu.yaml", ["train.trackers=[]"]).train.trackers == []


def test_trackers_without_a_destination_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="mlflow needs MLFLOW_TRACKING_URI"):
        check_trackers(["mlflow"], environ={})
    with pytest.raises(ConfigError, match="wandb needs WANDB_API_KEY in the environment, or WANDB_MODE=offline"):
        check_trackers(["wandb"], environ={"WANDB_MODE": "online"})
    check_trackers(["tensorboard", "wandb"], environ={"WANDB_MODE": "offline"})


def test_the_plan_carries_the_environment_but_never_shows_it(tmp_path):
    environ = {
        "MLFLOW_TRACKING_URI": "http://tracker:5000",
        "MLFLOW_TRACKING_TOKEN": SECRET_TOKEN,
        "WANDB_API_KEY": SECRET_KEY,
        "HOME": "/home/x",
    }
    plan = plan_tracking(["tensorboard", "mlflow", "wandb"], "exp", str(tmp_path), "run", {"a": 1}, environ=environ)
    assert plan.env == {
        "MLFLOW_TRACKING_URI": "http://tracker:5000",
        "MLFLOW_TRACKING_TOKEN": SECRET_TOKEN,
        "WANDB_API_KEY": SECRET_KEY,
        "WANDB_DIR": f"{tmp_path}/logs",
    }  # only the trackers' own
    assert SECRET_TOKEN not in repr(plan) and SECRET_KEY not in repr(plan)
    assert plan.tensorboard_dir == f"{tmp_path}/train/tensorboard" and plan.tensorboard_uri is None
    remote = plan_tracking(["tensorboard"], "exp", "s3://bucket/run", "run", environ={})
    assert remote.tensorboard_dir is None and remote.tensorboard_uri == "s3://bucket/run/train/tensorboard"
    with pytest.raises(ConfigError, match="wandb is offline and output_dir s3://bucket/run is a URI"):
        plan_tracking(["wandb"], "exp", "s3://bucket/run", "run", environ={"WANDB_MODE": "offline"})
    kept = plan_tracking(
        ["wandb"], "exp", "s3://bucket/run", "run", environ={"WANDB_MODE": "offline", "WANDB_DIR": "/mnt/shared/wandb"}
    )
    assert kept.env["WANDB_DIR"] == "/mnt/shared/wandb"


def test_evaluation_table_becomes_metrics():
    evaluation = {
        "models": {
            "teacher (cached outputs)": {"exact_match": 1.0, "prompts": 4},
            "trained student": {
                "exact_match": 0.5,
                "vs_initial": {"win_rate": 0.75, "wins": 3},
                "ece": float("nan"),
                "name": "x",
            },
        }
    }
    assert evaluation_metrics(evaluation) == {
        "eval/teacher/exact_match": 1.0,
        "eval/teacher/prompts": 4.0,
        "eval/trained_student/exact_match": 0.5,
        "eval/trained_student/vs_initial": 0.75,
    }


def test_rank_zero_and_the_driver_log_into_one_run_each(tmp_path, monkeypatch, mlflow_server):
    import mlflow

    for key, value in {
        "MLFLOW_TRACKING_URI": mlflow_server,
        "MLFLOW_TRACKING_TOKEN": SECRET_TOKEN,
        "WANDB_MODE": "offline",
        "WANDB_API_KEY": SECRET_KEY,
    }.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    plan = plan_tracking(
        ["tensorboard", "mlflow", "wandb"],
        "plad-ray-test",
        str(out),
        "demo",
        {"train": {"learning_rate": 1e-4, "loss": {"type": "hinge"}}},
    )
    rank0 = Tracker(plan, params=plan.config)  # what rank 0 opens
    for step, loss in ((1, 0.9), (2, 0.7), (3, 0.5)):
        rank0.log(step, {"step": step, "loss": loss, "accuracy": 0.5 + step / 10})
    rank0.log(3, {"ranking_accuracy": 0.8}, prefix="heldout")
    runs = rank0.close()
    assert set(runs) == {"mlflow", "wandb"}
    assert glob.glob(f"{out}/train/tensorboard/events.out.tfevents.*")

    time.sleep(1.1)  # W&B names offline run folders by the second; in a real run evaluation lies between the two
    summary = tmp_path / "summary.md"
    summary.write_text("# summary\n")
    plan.run_ids.update(runs)
    driver = Tracker(plan)  # what the driver opens after evaluation: the same runs
    driver.log_final({"eval/trained_student/exact_match": 0.4}, [str(summary), None])
    where = driver.where()
    driver.close()

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("plad-ray-test")
    found = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in found] == [runs["mlflow"]]
    run = found[0]
    assert run.info.run_name == "demo"
    assert run.data.params["train.learning_rate"] == "0.0001" and run.data.params["train.loss.type"] == "hinge"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0.9, 0.7, 0.5]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    assert run.data.metrics["heldout/ranking_accuracy"] == 0.8
    assert run.data.metrics["eval/trained_student/exact_match"] == 0.4
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["summary.md"]
    assert where == [
        f"mlflow run {run.info.run_id} ({mlflow_server}/#/experiments/{experiment.experiment_id}/runs/"
        f"{run.info.run_id})",
        f"wandb run {runs['wandb']} (offline: wandb sync {out}/logs/wandb/"
        f"{sorted(glob.glob(f'{out}/logs/wandb/offline-run-*'))[-1].split('/')[-1]})",
    ]

    history = wandb_history(out / "logs")
    assert [row["train/loss"] for row in history if "train/loss" in row] == [0.9, 0.7, 0.5]
    assert wandb_summaries(out / "logs")["eval/trained_student/exact_match"] == 0.4
    ids = {p.split("-")[-1] for p in glob.glob(f"{out}/logs/wandb/offline-run-*")}
    assert ids == {runs["wandb"]}  # the driver's part went to the run rank 0 opened
    for path in glob.glob(f"{out}/**/*", recursive=True):
        if path.endswith((".log", ".json", ".yaml", ".md", ".txt")):
            text = open(path, errors="replace").read()
            assert SECRET_TOKEN not in text and SECRET_KEY not in text, path


def test_tensorboard_uploads_to_a_uri_output_dir(tmp_path):
    target = tmp_path / "remote"
    plan = plan_tracking(["tensorboard"], "exp", f"file://{target}", "run", environ={})
    tracker = Tracker(plan, params={})
    tracker.log(1, {"loss": 1.0})
    tracker.sync()  # at a checkpoint
    assert glob.glob(f"{target}/train/tensorboard/events.out.tfevents.*")
    local = tracker.local_tb
    tracker.close()
    assert not glob.glob(f"{local}/*")
