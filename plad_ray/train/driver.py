"""The Ray Train driver: token ids (plad_ray.train.prepare) -> TorchTrainer of DeepSpeed workers -> HF export.

Each rank gets its feed (plad_ray.train.feeds): its fixed split of the training and held-out pairs, or its split
of train.stream's pairs. Re-running with the same output folder resumes from the last checkpoint: Ray Train
finds its own run state under `<output_dir>/train`.
"""

import os
import time
from dataclasses import replace

from plad_ray import console, pairs
from plad_ray.checks import Inputs
from plad_ray.config import StudentEngineConfig, TrainConfig
from plad_ray.data import parquet, storage
from plad_ray.data.layout import TRAIN
from plad_ray.errors import DataError, PladError, RuntimeFailure
from plad_ray.generate.schemas import PAIRS_READ_BY_TRAINING
from plad_ray.models.folders import embedding_rows
from plad_ray.run_context import RunContext
from plad_ray.tracking import plan_tracking
from plad_ray.train.plan import TrainPlan
from plad_ray.train.prepare import (
    PairText,
    heldout_shards,
    prepare_pairs,
    steps_per_epoch,
    teacher_wins_line,
    tokenize,
    trained_statuses,
)
from plad_ray.train.score_joins import with_teacher_scores, with_teacher_topk
from plad_ray.train.worker import train_loop_per_worker
from plad_ray.verifiers import TEACHER


def run_training(pairs_ds, plan: TrainPlan, text: PairText, use_gpu: bool = False, stream=None) -> dict:
    """Train, evaluate and export as `plan` says (its steps per epoch counted here from the pairs); returns the run's
    figures (also written by the caller). `text`: how the pairs' text becomes token ids.

    With `stream` (train.stream: a generate.student.PairStream), the ranks read the student engines' pairs
    as they are made (train.stream_feed) instead of `pairs_ds`; with more than one epoch it ends with a
    checkpoint (`plan.export` False), and the next call, with `plan.first_epoch_steps` (the streamed epoch's
    steps), trains the other epochs on the pairs on disk from it, and exports."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from plad_ray.train.stream_split import StreamSplit

    train = plan.train
    start = time.perf_counter()
    if stream is not None:
        # blocks as the engines make them: the ranks take whole blocks, so small ones keep their shares even
        datasets = {TrainPlan.STREAM: tokenize(stream.ds, text, train, batch_size=stream.block_rows)}
        counts, expected = None, stream.train_pairs
    else:
        datasets, counts = _fixed_shards(pairs_ds, text, train)
        expected = counts.get("train_prompts", counts["train"])
    prepare_s = time.perf_counter() - start
    for ds in datasets.values():
        # Each dataset executes in the workers with its own context; per-worker progress
        # bars interleave into noise there. Training reports progress as step lines.
        ds.context.enable_progress_bars = False
    steps = steps_per_epoch(expected, train)
    if steps < 1:
        per_step = train.micro_batch_size * train.num_workers * train.gradient_accumulation_steps
        raise DataError(
            f"pairs: {expected} training pairs are fewer than one optimizer step needs ({per_step} = "
            "train.micro_batch_size x train.num_workers x train.gradient_accumulation_steps); "
            "add prompts or lower those"
        )
    plan = replace(plan, steps_per_epoch=steps)
    if counts is None:
        print(
            f"[train] streaming: up to {stream.train_pairs} training pairs as the student engines make them, "
            f"{stream.heldout_pairs} held out (they come first); {train.num_workers} worker(s), "
            f"up to {plan.total_steps} "
            f"optimizer steps, ZeRO-{train.zero_stage} {train.precision}; no checkpoint in the streamed epoch"
            + ("" if plan.export else f", one at its end (epochs 2-{train.num_epochs} read the pairs from disk)"),
            flush=True,
        )
    else:
        if train.scorer:
            print(f"[train] scorer {train.scorer}: " + teacher_wins_line(counts, train.student_wins), flush=True)
        what = (
            f"{counts['train_prompts']} training prompts ({counts['train']} pairs)"
            if "train_prompts" in counts
            else f"{counts['train']} training pairs"
        )
        print(
            f"[train] {what}, {counts['heldout']} held out, {train.num_workers} worker(s), {plan.total_steps} "
            f"optimizer steps, ZeRO-{train.zero_stage} {train.precision}",
            flush=True,
        )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            placement_strategy=train.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets=datasets,
        # Ray Train splits only the stream (in the stream's order: held-out pairs first; train.stream_split); the
        # fixed shards are split by _fixed_shards, in a fixed order.
        dataset_config=(
            StreamSplit(TrainPlan.STREAM, _in_order())
            if counts is None
            else ray.train.DataConfig(datasets_to_split=[], execution_options=_in_order())
        ),
        run_config=ray.train.RunConfig(
            name=TRAIN,
            storage_path=plan.run_dir,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
        ),
    )
    start, started_at = time.perf_counter(), time.time()
    console.route_libraries()  # Ray Train sets up its loggers on import
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise _worker_user_error(e) or e
    fit_s = time.perf_counter() - start
    if result.error is not None:
        raise _worker_user_error(result.error) or RuntimeFailure(f"training failed: {result.error}")
    out = dict(result.return_value)
    if counts is None:
        counts = out.pop("stream_counts")
        print(
            f"[train] the stream brought {counts['pairs']} pairs: trained on {counts['trained']}, "
            f"{counts['heldout']} held out, {counts['untrained']} written to pairs/ but not trained (past the "
            f"planned {out['steps']} steps, or short of a whole step at a rank's end); "
            f"dropped: {counts['dropped_too_long']} too long, {counts['dropped_identical']} identical",
            flush=True,
        )
    worker = out.pop("worker_timings")
    phases = {k: worker.get(k, 0.0) for k in ("eval_s", "loop_s", "export_s")}
    # Start-up: Ray Train's controller and worker group, model load, DeepSpeed init (and any restarts).
    out["timings"] = {
        "prepare_s": prepare_s,
        "startup_s": fit_s - sum(phases.values()),
        **phases,
        "startup": startup_breakdown(worker, out.pop("worker_started_at") - started_at, fit_s),
    }
    return {**out, "counts": counts, "checkpoint": plan.export_uri}


def _fixed_shards(pairs_ds, text: PairText, train: TrainConfig) -> tuple[dict, dict]:
    """The Ray Train datasets of pairs on disk: each rank's fixed training split and held-out share; the counts."""
    train_ds, heldout_ds, counts = prepare_pairs(pairs_ds, text, train)
    # Each rank gets a fixed, ordered split of the training pairs (not Ray Data's streaming split, which
    # hands out blocks as they arrive): an epoch reads the same micro-batches every time, so a run resumed
    # from a mid-epoch checkpoint skips exactly the steps it trained (README "Resuming").
    shards = train_ds.split(train.num_workers, equal=True)
    # Held-out scoring is shared out too (within one pair per rank; the figures are all-reduced).
    eval_shards = heldout_shards(heldout_ds, counts["heldout"], train.num_workers)
    datasets = {
        **{TrainPlan.train_shard(rank): shard for rank, shard in enumerate(shards)},
        **{TrainPlan.eval_shard(rank): shard for rank, shard in enumerate(eval_shards)},
    }
    return datasets, counts


STARTUP_PHASES = (
    "imports_s",
    "model_load_s",
    "deepspeed_init_s",
    "teacher_load_s",
    "resume_s",
    "trackers_s",
    "eval_data_s",
)


def _worker_user_error(error: Exception) -> PladError | None:
    """A user-facing error a rank raised (e.g. train.packing's check), for its one line instead of Ray's report."""
    for failure in getattr(error, "worker_failures", {}).values():
        if isinstance(failure, PladError):
            return failure
    return None


def startup_breakdown(worker: dict, worker_start_s: float, fit_s: float) -> dict:
    """Rank 0's start-up by phase: `worker_group_s` from trainer.fit() to the training function's first
    line (Ray Train's controller, the worker actors, the process group; a restart's lost work too), then
    the function's own phases, and `teardown_s` from its return to fit()'s (the last upload, shutdown)."""
    phases = {"worker_group_s": worker_start_s, **{k: worker.get(k, 0.0) for k in STARTUP_PHASES}}
    worker_s = sum(worker.values())
    phases["teardown_s"] = fit_s - worker_start_s - worker_s
    return phases


def _pairs_on_disk(train: TrainConfig, run: RunContext, round: int, student_path: str, trust_remote_code: bool):
    """The round's pairs (or the given train.pairs) as a Ray Dataset, with the teacher's scores the objective
    reads joined in (top-k ids checked against `student_path`'s embedding rows)."""
    layout = run.layout
    if train.pairs is not None:
        pairs_ds = parquet.read_dataset(train.pairs, file_extensions=["parquet"]).map_batches(
            pairs.with_training_columns,
            fn_kwargs={"heldout_fraction": run.heldout_fraction},
            batch_format="pandas",
        )
    else:
        parquet.require_columns(layout.pairs(round), PAIRS_READ_BY_TRAINING, "pairs")
        pairs_ds = parquet.read(layout.pairs(round))
    if pairs_ds is None:
        raise DataError(f"pairs {layout.pairs(round)}: missing or incomplete; run jobs.generate_pairs first")
    objective = train.loss.objective
    if train.scorer == TEACHER or objective.reads_topk:
        scores_uri = train.teacher_scores or layout.scores(round)
        made = storage.manifest(train.pairs or layout.pairs(round))
        rows = made["rows"] if made is not None else pairs_ds.count()  # given pairs need not be an engine output
        if train.scorer == TEACHER:
            pairs_ds = with_teacher_scores(pairs_ds, scores_uri, rows)
        if objective.reads_topk:
            source = "config key train.teacher_scores:" if train.teacher_scores else "teacher scores"
            pairs_ds = with_teacher_topk(
                pairs_ds,
                scores_uri,
                rows,
                objective.topk_sides,
                embedding_rows(student_path, trust_remote_code),
                source,
            )
    return pairs_ds


def train_student(
    train: TrainConfig,
    student: StudentEngineConfig,
    run: RunContext,
    inputs: Inputs,
    teacher_stop: str | None = None,
    log=print,
    round: int = 1,
    stream=None,
) -> dict:
    """Train on round `round`'s pairs, evaluate before/after, export the student; writes train_report.json.

    `student`: its tokenizer settings and stop string cut the pairs' text (`teacher_stop`: the teacher's) where it
    has no ids. `stream` (train.stream): the student engines' pairs (generate.student.PairStream), trained on as
    they are made instead of pairs/ on disk."""
    from transformers import AutoTokenizer

    layout = run.layout
    report_uri, export_uri = layout.train_report(round), layout.student(round)
    done = storage.read_json(report_uri)
    if done is not None and storage.manifest(export_uri) is not None:
        log(f"[train] round {round} already complete: {export_uri} and {report_uri}")
        return done
    # a streamed first epoch's report (train.stream, num_epochs > 1): the other epochs resume from its checkpoint
    streamed = done.get("streamed_epoch_steps") if done is not None and stream is None else None
    if streamed:
        log(
            f"[train] round {round}: the streamed first epoch took {streamed} steps; epochs 2-{train.num_epochs} "
            "resume from its checkpoint and read the pairs from disk"
        )
    student_path = inputs.student_for_round(run, round)
    pairs_ds = None
    if stream is None:
        pairs_ds = _pairs_on_disk(train, run, round, student_path, student.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(student_path, trust_remote_code=student.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    stops = (None, None) if train.pairs is not None else (teacher_stop, student.sampling.stop)
    root, run_dir = storage.absolute(layout.root), storage.absolute(layout.round_dir(round))
    name = os.path.basename(root.rstrip("/")) + ("" if round == 1 else f"-round-{round}")
    tracking = plan_tracking(
        train.trackers,
        train.experiment,
        root,
        name,
        run.settings,
        round_dir=run_dir,
    )
    plan = TrainPlan(
        train=train,
        model_path=student_path,
        export_uri=export_uri,
        tracking=tracking,
        pad_id=pad_id,
        trust_remote_code=student.trust_remote_code,
        allow_pickle=student.allow_pickle_weights,
        teacher_path=inputs.teacher_path,
        run_dir=run_dir,
        trace_pairs_dir=os.environ.get("PLAD_RAY_TRACE_PAIRS"),
        stream=stream is not None,
        trained_statuses=trained_statuses(train),
        first_epoch_steps=streamed,
        export=stream is None or train.num_epochs == 1,
    )
    text = PairText(student_path, student.chat_template, student.trust_remote_code, stops)
    result = run_training(pairs_ds, plan, text, run.use_gpu, stream=stream)
    result["train_seconds"] = time.perf_counter() - start
    if stream is not None and train.num_epochs > 1:
        result["streamed_epoch_steps"] = result["steps"]
    elif streamed:
        result["streamed_epoch_steps"] = streamed
        result["train_seconds"] += done["train_seconds"]
    result["round"] = round
    storage.write_json(report_uri, result)
    log(f"[train] round {round} report -> {report_uri}")
    return result


def _in_order():
    """Ray Train's ingest options (it replaces each dataset's own) with the blocks read in order."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options
