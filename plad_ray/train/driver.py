"""The Ray Train driver: pairs -> token ids (Ray Data) -> TorchTrainer of DeepSpeed workers.

Held-out pairs (the `heldout` column, a deterministic split by prompt id) are scored
before and after training; the rest are trained on. Pairs where teacher and student
wrote the same text carry no ranking signal (the hinge is constant) and are dropped
from both, and counted. Re-running with the same output folder resumes from the last
checkpoint: Ray Train finds its own run state under `<output_dir>/train`.
"""

import math
import os
import time

from plad_ray.config import ClusterConfig, TrainConfig
from plad_ray.errors import DataError, RuntimeFailure
from plad_ray.train.batching import PairTokenizer
from plad_ray.train.metrics import tensorboard_dir
from plad_ray.train.worker import TrainPlan, train_loop_per_worker

TRAIN_RUN_NAME = "train"


def prepare_pairs(pairs_ds, model_path: str, train: TrainConfig, chat_template: bool, trust_remote_code: bool):
    """(train, heldout) datasets of token ids, and counts of every pair by what happened to it.

    One Ray Data pass: shuffle (training order), tokenize with the student's tokenizer,
    materialise; the splits are filters over the materialised result.
    """
    tokenized = (
        pairs_ds.random_shuffle(seed=train.seed)
        .map_batches(
            PairTokenizer,
            fn_constructor_kwargs=dict(model_path=model_path, max_length=train.max_length,
                                       chat_template=chat_template, trust_remote_code=trust_remote_code,
                                       scorer=train.scorer, student_wins=train.student_wins),
            batch_size=256,
            concurrency=1,
            num_cpus=0.5,
        )
        .materialize()
    )
    import pyarrow as pa
    import ray

    table = pa.concat_tables(ray.get(tokenized.select_columns(["status", "heldout", "verdict"]).to_arrow_refs()))
    statuses, heldout = table.column("status").to_pylist(), table.column("heldout").to_pylist()
    counts = {"pairs": len(statuses)}
    for status in ("identical", "too_long", "student_better"):
        counts[f"dropped_{status}"] = statuses.count(status)
    if train.scorer:
        verdicts = table.column("verdict").to_pylist()
        counts.update({f"{who}_wins" if who != "tie" else "ties": verdicts.count(who)
                       for who in ("teacher", "tie", "student")})
        counts["flipped_student_better"] = counts["student_wins"] if train.student_wins == "flip" else 0
    counts["train"] = sum(s == "ok" and not h for s, h in zip(statuses, heldout))
    counts["heldout"] = sum(s == "ok" and h for s, h in zip(statuses, heldout))
    ok = tokenized.filter(expr="status == 'ok'")
    return ok.filter(expr="heldout == False"), ok.filter(expr="heldout == True"), counts


def teacher_wins_line(counts: dict, policy: str) -> str:
    """How often PLaD's teacher-wins assumption held, by the scorer's verdicts."""
    n = max(counts["pairs"], 1)
    return (f"teacher-wins assumption held on {counts['teacher_wins']}/{counts['pairs']} pairs "
            f"({counts['teacher_wins'] / n:.1%}); ties {counts['ties']}, student won {counts['student_wins']} "
            f"(student_wins={policy})")


def steps_per_epoch(train_rows: int, train: TrainConfig) -> int:
    """Optimizer steps per epoch; every worker gets train_rows // num_workers rows."""
    rows_per_worker = train_rows // train.num_workers
    micro_batches = math.ceil(rows_per_worker / train.micro_batch_size)
    return micro_batches // train.gradient_accumulation_steps


def run_training(pairs_ds, model_path: str, train: TrainConfig, cluster: ClusterConfig, output_dir: str,
                 export_uri: str, pad_id: int, chat_template: bool = False, trust_remote_code: bool = False,
                 allow_pickle: bool = False, teacher_path: str | None = None) -> dict:
    """Train, evaluate and export; returns the run's figures (also written by the caller)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    start = time.perf_counter()
    train_ds, heldout_ds, counts = prepare_pairs(pairs_ds, model_path, train, chat_template, trust_remote_code)
    prepare_s = time.perf_counter() - start
    for ds in (train_ds, heldout_ds):
        # Each dataset executes in the workers with its own context; per-worker progress
        # bars interleave into noise there. Training reports progress as step lines.
        ds.context.enable_progress_bars = False
    steps = steps_per_epoch(counts["train"], train)
    if steps < 1:
        per_step = train.micro_batch_size * train.num_workers * train.gradient_accumulation_steps
        raise DataError(
            f"pairs: {counts['train']} training pairs are fewer than one optimizer step needs ({per_step} = "
            "train.micro_batch_size x train.num_workers x train.gradient_accumulation_steps); add prompts or lower those"
        )
    plan = TrainPlan(train=train, model_path=model_path, export_uri=export_uri,
                     tensorboard_dir=tensorboard_dir(_storage_path(output_dir), train.tensorboard), steps_per_epoch=steps,
                     pad_id=pad_id, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                     teacher_path=teacher_path)
    if train.scorer:
        print(f"[train] scorer {train.scorer}: " + teacher_wins_line(counts, train.student_wins), flush=True)
    print(f"[train] {counts['train']} training pairs, {counts['heldout']} held out, "
          f"{train.num_workers} worker(s), {plan.total_steps} optimizer steps, ZeRO-{train.zero_stage} {train.precision}",
          flush=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=cluster.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker, **({"GPU": 1} if cluster.use_gpu else {})},
            placement_strategy=train.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if cluster.use_gpu else "gloo"),
        datasets={"train": train_ds, "eval": heldout_ds},
        # Only the training pairs are sharded; every rank scores all held-out pairs, so the
        # evaluation drops none (an equal split would) and ZeRO-3 ranks stay in step.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=TRAIN_RUN_NAME,
            storage_path=_storage_path(output_dir),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
        ),
    )
    start = time.perf_counter()
    result = trainer.fit()
    fit_s = time.perf_counter() - start
    if result.error is not None:
        raise RuntimeFailure(f"training failed: {result.error}")
    out = dict(result.return_value)
    worker = out.pop("worker_timings")
    phases = {k: worker.get(k, 0.0) for k in ("eval_s", "loop_s", "export_s")}
    # Start-up: Ray Train's controller and worker group, model load, DeepSpeed init (and any restarts).
    out["timings"] = {"prepare_s": prepare_s, "startup_s": fit_s - sum(phases.values()), **phases}
    return {**out, "counts": counts, "checkpoint": export_uri}


def _storage_path(output_dir: str) -> str:
    return output_dir if "://" in output_dir else os.path.abspath(output_dir)
