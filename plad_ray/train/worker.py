"""The per-worker training loop: one DeepSpeed rank inside a Ray Train worker.

Ray Train owns rendezvous (the process group DeepSpeed reuses), checkpoint bookkeeping
and restarts, and hands each rank its dataset (the driver's fixed split of the training
pairs, or the pair stream: its feed, plad_ray.train.feeds); this loop owns the model, the PLaD loss, the evaluation
before and after training, and the HF export.

    evaluate(initial) -> [forward 2B sequences -> PLaD loss -> DeepSpeed step, evaluate every N steps]*
                      -> evaluate(trained) -> export

What a step feeds the model is in plad_ray.train.feed; the held-out evaluation and the
collapse guard in plad_ray.train.heldout; checkpoints in plad_ray.train.checkpoints.
"""

import json
import resource
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from plad_ray.losses import step_term_scales
from plad_ray.tracking import Tracker
from plad_ray.train.checkpoints import Progress, resume, save
from plad_ray.train.ds_config import deepspeed_config, lr_factor
from plad_ray.train.export import export_hf
from plad_ray.train.feed import Frozen, check_packing, forward, term_counts
from plad_ray.train.feeds import open_feed
from plad_ray.train.heldout import check_guard, evaluate
from plad_ray.train.plan import TrainPlan
from plad_ray.train.step_log import Window


def train_loop_per_worker(config: dict) -> dict | None:
    """Ray Train entry point; returns the run's figures on rank 0."""
    import ray.train

    plan: TrainPlan = config["plan"]
    rank = ray.train.get_context().get_world_rank()
    log = partial(_log, rank)
    clock = _Clock()
    torch.manual_seed(plan.train.seed)
    engine = _initialize(plan, ray.train.get_context().get_world_size(), clock)
    frozen = Frozen(_load_teacher(plan, engine.device), _load_reference(plan, engine.device))
    clock.lap("teacher_load_s")  # the frozen models: token_kd's teacher, dpo's reference
    progress = resume(engine)
    clock.lap("resume_s")
    metrics = _open_trackers(plan, progress, rank)
    clock.lap("trackers_s")
    feed = open_feed(plan, rank)
    eval_batches = feed.heldout()
    clock.lap("eval_data_s")
    if progress.eval_initial is None:
        progress.eval_initial = evaluate(engine, eval_batches, plan, frozen)
        log(f"[train] held-out pairs before training: {_fmt(progress.eval_initial)}")
        metrics.log(0, progress.eval_initial, prefix="heldout")
    clock.lap("eval_s")
    if plan.train.guard.action == "stop" and progress.last_checkpoint is None:
        # the last good state, should the very first evaluation trip the guard
        save(engine, progress, rank, staging=plan.train.checkpoint_staging_dir)
    trained_rows = _train(engine, feed, plan, progress, rank, metrics, frozen, eval_batches)
    feed_counts = feed.finish(trained_rows)  # a stream's counts; None for fixed shards
    clock.lap("loop_s")
    if not plan.export:  # a streamed first epoch of several: the next ones resume from here, reading pairs/
        save(engine, progress, rank, upload="sync", staging=plan.train.checkpoint_staging_dir)
        tracker_runs = metrics.close()
        clock.lap("export_s")
        return _figures(progress, None, tracker_runs, clock, feed_counts) if rank == 0 else None
    eval_trained = evaluate(engine, eval_batches, plan, frozen)
    if check_guard(engine, plan, progress, eval_trained, log) and plan.train.guard.action == "stop":
        eval_trained = evaluate(engine, eval_batches, plan, frozen)  # of the restored checkpoint
    log(f"[train] held-out pairs after training: {_fmt(eval_trained)}")
    metrics.log(progress.step, eval_trained, prefix="heldout")
    tracker_runs = metrics.close()
    clock.lap("eval_s")
    export_hf(engine, plan, rank)
    clock.lap("export_s")
    return _figures(progress, eval_trained, tracker_runs, clock, feed_counts) if rank == 0 else None


def _figures(
    progress: Progress, eval_trained: dict | None, tracker_runs: dict, clock: "_Clock", stream_counts: dict | None
) -> dict:
    """Rank 0's report of the run."""
    return {
        "steps": progress.step,
        "curve": progress.curve,
        "eval_initial": progress.eval_initial,
        "eval_trained": eval_trained,
        "evals": progress.evals,
        "guard": progress.guard,
        "checkpoint_s": progress.checkpoint_s,
        "tracker_runs": tracker_runs,
        "worker_timings": clock.laps,
        "worker_started_at": clock.started_at,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **({"stream_counts": stream_counts} if stream_counts is not None else {}),
    }


def _open_trackers(plan: TrainPlan, progress: Progress, rank: int) -> Tracker:
    """Rank 0 opens the run's trackers (the same runs again after a restart from a checkpoint); others none."""
    if rank != 0 or plan.tracking is None or not plan.tracking.trackers:
        return Tracker(None)
    plan.tracking.run_ids.update(progress.tracker_runs)
    tracker = Tracker(plan.tracking, params=plan.tracking.config)
    progress.tracker_runs = dict(plan.tracking.run_ids)
    return tracker


class _Clock:
    """Seconds spent per phase of this worker (phases may recur: laps add up); `started_at`: the
    wall-clock time the training function began (the driver measures the worker group's start-up
    against it)."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self.started_at = time.time()
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now


def _import_deepspeed():
    """`import deepspeed` without MLflow: DeepSpeed's autotuner (which plad-ray does not use) imports MLflow
    whenever it is installed, 1.5 of DeepSpeed's 2 s import on each rank here. The rank that logs to MLflow
    (plad_ray.tracking) imports it itself, later."""
    import sys

    if "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # `import mlflow` raises ModuleNotFoundError; DeepSpeed's autotuner goes without
    try:
        import deepspeed
    finally:
        del sys.modules["mlflow"]
    return deepspeed


def _initialize(plan: TrainPlan, world_size: int, clock: _Clock | None = None):
    """The DeepSpeed engine of the student; `clock` gets the imports', the load's and the initialisation's laps."""
    import transformers  # noqa: F401 - imported before the clock's imports_s lap, as it always was

    clock = clock or _Clock()
    deepspeed = _import_deepspeed()

    clock.lap("imports_s")
    ds_config = deepspeed_config(plan.train, world_size)
    if plan.train.zero_stage == 3:
        # Partition weights while loading instead of materialising the full model per rank.
        from transformers.integrations import HfDeepSpeedConfig

        _keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 - read by from_pretrained below
    model = _student_model(plan, torch.float32)
    model.config.use_cache = False
    if plan.train.gradient_checkpointing:  # non-reentrant: works under ZeRO-3's gathered parameters
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    clock.lap("model_load_s")
    optimizer = None
    if not plan.train.offload_optimizer:
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=plan.train.learning_rate,
            weight_decay=plan.train.weight_decay,
            fused=torch.cuda.is_available(),
        )
    schedule = partial(lr_factor, warmup_steps=plan.train.warmup_steps, total_steps=plan.total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=ds_config,
    )
    clock.lap("deepspeed_init_s")
    return engine


def _student_model(plan: TrainPlan, dtype):
    """The round's initial student (plan.model_path) as transformers loads it for training: the trainer's copy, and
    dpo's frozen reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        plan.model_path,
        dtype=dtype,
        trust_remote_code=plan.trust_remote_code,
        use_safetensors=None if plan.allow_pickle else True,
        **({"attn_implementation": plan.train.attn_implementation} if plan.train.attn_implementation else {}),
    )


def _load_teacher(plan: TrainPlan, device):
    """token_kd: the teacher as a frozen fp32 module on the rank's device, beside the student's batch
    (not sharded: KD baselines are small)."""
    if not plan.train.loss.objective.needs_local_teacher:
        return None
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(
        plan.teacher_path, dtype=torch.float32, trust_remote_code=plan.trust_remote_code, use_safetensors=True
    )
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def _load_reference(plan: TrainPlan, device):
    """dpo: the round's initial student (plan.model_path), frozen on the rank's device in the training precision,
    not sharded: a full copy beside the student (TRL's reference model; README "The loss family")."""
    if not plan.train.loss.objective.needs_reference:
        return None
    # loaded as the student is, so both agree before step 1
    reference = _student_model(plan, torch.bfloat16 if plan.train.precision == "bf16" else torch.float32)
    reference.requires_grad_(False)
    return reference.to(device).eval()


def _train(engine, feed, plan: TrainPlan, progress: Progress, rank: int, metrics: Tracker, frozen, eval_batches) -> int:
    """The training loop over a feed (plad_ray.train.feeds); the rows (pairs; listwise: prompts) this rank trained
    on."""
    train = plan.train
    window = Window()
    stop_mode = train.guard.action == "stop" and train.guard.max_logp_drop is not None
    distributed = torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if distributed else 1
    log = partial(_log, rank)
    packing_checked = False
    trained_rows = 0
    while progress.step < plan.total_steps:
        epoch, done_in_epoch = plan.position(progress.step)
        engine.train()
        for index, (step_batches, spare) in enumerate(feed.steps(train, plan.pad_id, epoch, window)):
            if index < done_in_epoch:
                continue  # consumed before the checkpoint this run resumed from
            now = _phase(train, progress.step, plan.total_steps, log)  # train.loss.seqkd_first: seqkd, then the loss
            # (ranking terms, chosen tokens) of each micro-batch; a spare step's weigh nothing
            counts = [(0.0, 0.0) if spare else term_counts(batch, now) for batch in step_batches]
            step_totals_2 = torch.tensor(counts, dtype=torch.float64).sum(0)
            if distributed:
                torch.distributed.all_reduce(step_totals_2)  # over every rank's micro-batches of the step
            step_ranked, step_tokens = step_totals_2[0].item(), step_totals_2[1].item()
            for batch, (ranked, tokens) in zip(step_batches, counts):
                if train.packing and not packing_checked:
                    log(
                        f"[train] packing: first micro-batch's packed log-probs within "
                        f"{check_packing(engine, batch):.2g} nats per token of the padded ones"
                    )
                    packing_checked = True
                scales = step_term_scales(ranked, tokens, step_ranked, step_tokens, len(step_batches), world)
                stats = forward(engine, batch, now, frozen, scales)
                engine.backward(stats["loss"])
                engine.step()
                if not spare:
                    window.add({k: v.detach() for k, v in stats.items()}, batch)
            progress.step += 1
            if not spare:  # a spare step trained none of its pairs; it still joins the collectives below
                trained_rows += sum(len(batch["keys"]) for batch in step_batches)
                if plan.trace_pairs_dir:
                    _trace(plan.trace_pairs_dir, rank, progress.step, epoch, step_batches)
            if window.count and (progress.step % train.log_every_steps == 0 or progress.step == plan.total_steps):
                entry = window.flush(progress.step, epoch, engine.get_lr()[0])
                progress.curve.append(entry)
                metrics.log(progress.step, entry)
                done = progress.step / plan.total_steps
                log(f"[train] step {progress.step}/{plan.total_steps} ({done:.0%}) epoch {epoch} {_fmt(entry)}")
            end_of_epoch = plan.position(progress.step)[1] == 0
            before_end = progress.step < plan.total_steps
            checkpoint_every = train.checkpoint_every_steps
            # a streamed epoch is not checkpointed (its order is the engines'; README "Streaming")
            checkpoint = (
                before_end
                and not feed.single_pass
                and (
                    (checkpoint_every and progress.step % checkpoint_every == 0)
                    or (not checkpoint_every and end_of_epoch)
                )
            )
            # In stop mode every checkpoint follows an evaluation that passed, and every evaluation that
            # passes is checkpointed: the newest checkpoint is always the last good one.
            if before_end and (
                (train.eval_every_steps and progress.step % train.eval_every_steps == 0) or (stop_mode and checkpoint)
            ):
                figures = evaluate(engine, eval_batches, plan, frozen)
                progress.evals.append({"step": progress.step, **figures})
                metrics.log(progress.step, figures, prefix="heldout")
                log(f"[train] held-out pairs at step {progress.step}: {_fmt(figures)}")
                if check_guard(engine, plan, progress, figures, log) and stop_mode:
                    return
                checkpoint = checkpoint or stop_mode
            if checkpoint:  # stop mode waits for each upload: the guard may restore the newest at once
                metrics.sync()
                save(
                    engine,
                    progress,
                    rank,
                    upload="sync" if stop_mode else train.checkpoint_upload,
                    staging=train.checkpoint_staging_dir,
                )
            if end_of_epoch or progress.step >= plan.total_steps:
                break  # a stream bringing more pairs than planned ends here too: the rest is written, not trained
        if feed.single_pass:  # the stream ended, or its planned steps did: one epoch, whatever its length
            if window.count:
                entry = window.flush(progress.step, epoch, engine.get_lr()[0])
                progress.curve.append(entry)
                metrics.log(progress.step, entry)
                log(f"[train] step {progress.step} (the stream's last) epoch {epoch} {_fmt(entry)}")
            break
    return trained_rows


def _phase(train, step: int, total_steps: int, log):
    """The train config step `step` trains with: seqkd for the first train.loss.seqkd_first of the steps, then
    train.loss (the paper's SFT-then-calibration recipe). Logs the switch."""
    loss = train.loss.at_step(step, total_steps)
    if loss is train.loss:
        if step and step == train.loss.seqkd_steps(total_steps):
            log(f"[train] step {step}: seqkd's {step} steps are done; {train.loss.type} from here")
        return train
    return replace(train, loss=loss)


def _trace(folder: str, rank: int, step: int, epoch: int, step_batches: list[dict]) -> None:
    """Append the step's pair keys to <folder>/rank-<rank>.jsonl (tests prove resume exactness with it)."""
    keys = [key for batch in step_batches for key in batch["keys"]]
    with open(Path(folder) / f"rank-{rank}.jsonl", "a") as out:
        out.write(json.dumps({"step": step, "epoch": epoch, "keys": keys}) + "\n")


def _log(rank: int, line: str) -> None:
    if rank == 0:
        print(line, flush=True)


def _fmt(stats: dict) -> str:
    return " ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items() if k not in ("step", "epoch")
    )
