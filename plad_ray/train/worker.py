"""The per-worker training loop: one DeepSpeed rank inside a Ray Train worker.

Ray Train owns rendezvous (the process group DeepSpeed reuses), data sharding,
checkpoint bookkeeping and restarts; this loop owns the model, the PLaD loss, the
evaluation before and after training, and the HF export.

    evaluate(initial) -> [forward 2B sequences -> PLaD loss -> DeepSpeed step, evaluate every N steps]*
                      -> evaluate(trained) -> export

The collapse guard (`train.guard`) watches what the ranking loss can quietly destroy: the
student's log-prob per token of the held-out teacher outputs. A ranking loss can win the
ranking by making both outputs less likely; when that log-prob falls more than
`max_logp_drop` below its value before training, rank 0 says so in one line, the report
records it, and with `action: stop` training ends at the last checkpoint that passed.
"""

import json
import resource
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from plad_ray.config import TrainConfig
from plad_ray.losses import plad_loss, sequence_logps, step_term_scales, token_kd_loss
from plad_ray.train.batching import collate_groups, collate_pairs, length_grouped
from plad_ray.train.ds_config import deepspeed_config, lr_factor
from plad_ray.train.export import export_hf
from plad_ray.train.metrics import MetricsWriter

PROGRESS_FILE = "plad_progress.json"
CHECKPOINT_TAG = "state"


@dataclass
class TrainPlan:
    """Everything a worker needs, computed by the driver."""

    train: TrainConfig
    model_path: str
    export_uri: str  # where rank 0 publishes the trained model (HF folder)
    tensorboard_dir: str | None  # where rank 0 writes TensorBoard event files (None: off)
    steps_per_epoch: int  # optimizer steps per epoch (identical on every worker)
    pad_id: int
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load .bin weights (student.allow_pickle_weights); else safetensors only
    teacher_path: str | None = None  # token_kd only: the teacher, frozen, for its token distributions
    checkpoint_root: str = ""  # where Ray Train persists this run's checkpoints (<output_dir>/train)

    @property
    def total_steps(self) -> int:
        steps = self.steps_per_epoch * self.train.num_epochs
        return steps if self.train.max_steps is None else min(steps, self.train.max_steps)


class _Collate(NumpyBatchCollateFn):
    """collate_pairs as the callable class Ray Data's iter_torch_batches expects."""

    def __init__(self, pad_id: int):
        super().__init__()
        self.pad_id = pad_id

    def __call__(self, batch: dict) -> dict:
        return collate_pairs(batch, self.pad_id)


@dataclass
class Progress:
    """What a checkpoint remembers beyond DeepSpeed's own state."""

    step: int = 0
    curve: list = field(default_factory=list)  # one entry per logged step
    eval_initial: dict | None = None
    evals: list = field(default_factory=list)  # held-out figures every train.eval_every_steps: {step, ...}
    guard: dict | None = None  # set when the collapse guard tripped: step, log-probs, what was done
    last_checkpoint: int | None = None  # step of the newest checkpoint of this run


def train_loop_per_worker(config: dict) -> dict | None:
    """Ray Train entry point; returns the run's figures on rank 0."""
    import ray.train

    plan: TrainPlan = config["plan"]
    rank = ray.train.get_context().get_world_rank()
    clock = _Clock()
    torch.manual_seed(plan.train.seed)
    engine = _initialize(plan, ray.train.get_context().get_world_size())
    teacher = _load_teacher(plan, engine.device)
    progress = _resume(engine)
    metrics = MetricsWriter(plan.tensorboard_dir if rank == 0 else None)
    clock.lap("init_s")
    # The held-out pairs are read once and kept as batches: they are scored every eval_every_steps.
    eval_batches = list(ray.train.get_dataset_shard("eval").iter_torch_batches(
        batch_size=plan.train.micro_batch_size, collate_fn=_Collate(plan.pad_id)))
    if progress.eval_initial is None:
        progress.eval_initial = evaluate(engine, eval_batches, plan, teacher)
        _log(rank, f"[train] held-out pairs before training: {_fmt(progress.eval_initial)}")
        metrics.log(0, progress.eval_initial, prefix="heldout")
    clock.lap("eval_s")
    if plan.train.guard.action == "stop" and progress.last_checkpoint is None:
        _save(engine, progress, rank)  # the last good state, should the very first evaluation trip the guard
    _train(engine, ray.train.get_dataset_shard("train"), plan, progress, rank, metrics, teacher, eval_batches)
    clock.lap("loop_s")
    eval_trained = evaluate(engine, eval_batches, plan, teacher)
    if _check_guard(engine, plan, progress, eval_trained, rank) and plan.train.guard.action == "stop":
        eval_trained = evaluate(engine, eval_batches, plan, teacher)  # of the restored checkpoint
    _log(rank, f"[train] held-out pairs after training: {_fmt(eval_trained)}")
    metrics.log(progress.step, eval_trained, prefix="heldout")
    metrics.close()
    clock.lap("eval_s")
    export_hf(engine, plan, rank)
    clock.lap("export_s")
    if rank == 0:
        return {"steps": progress.step, "curve": progress.curve, "eval_initial": progress.eval_initial,
                "eval_trained": eval_trained, "evals": progress.evals, "guard": progress.guard,
                "worker_timings": clock.laps, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return None


class _Clock:
    """Seconds spent per phase of this worker (phases may recur: laps add up)."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now


def _initialize(plan: TrainPlan, world_size: int):
    import deepspeed
    from transformers import AutoModelForCausalLM

    ds_config = deepspeed_config(plan.train, world_size)
    if plan.train.zero_stage == 3:
        # Partition weights while loading instead of materialising the full model per rank.
        from transformers.integrations import HfDeepSpeedConfig

        _keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 - read by from_pretrained below
    model = AutoModelForCausalLM.from_pretrained(
        plan.model_path, dtype=torch.float32, trust_remote_code=plan.trust_remote_code,
        use_safetensors=None if plan.allow_pickle else True,
    )
    model.config.use_cache = False
    optimizer = None
    if not plan.train.offload_optimizer:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=plan.train.learning_rate, weight_decay=plan.train.weight_decay,
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
    return engine


def _load_teacher(plan: TrainPlan, device):
    """token_kd: the teacher as a frozen fp32 module on the rank's device, beside the student's batch
    (not sharded: KD baselines are small)."""
    if plan.train.loss.type != "token_kd":
        return None
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(plan.teacher_path, dtype=torch.float32,
                                                   trust_remote_code=plan.trust_remote_code, use_safetensors=True)
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def _resume(engine) -> Progress:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Progress()
    with checkpoint.as_directory() as folder:
        engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
        progress = Progress(**json.loads((Path(folder) / PROGRESS_FILE).read_text()))
    print(f"[train] resumed from checkpoint at step {progress.step}", flush=True)
    return progress


def _train(engine, shard, plan: TrainPlan, progress: Progress, rank: int, metrics: MetricsWriter, teacher,
           eval_batches) -> None:
    t = plan.train
    window = _Window()
    stop_mode = t.guard.action == "stop" and t.guard.max_logp_drop is not None
    distributed = torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if distributed else 1
    while progress.step < plan.total_steps:
        epoch = progress.step // plan.steps_per_epoch
        done_in_epoch = progress.step - epoch * plan.steps_per_epoch
        engine.train()
        for index, step_batches in enumerate(_steps(shard, t, plan.pad_id, epoch)):
            if index < done_in_epoch:
                continue  # consumed before the checkpoint this run resumed from
            counts = [_term_counts(batch, t) for batch in step_batches]
            totals = torch.tensor(counts, dtype=torch.float64).sum(0)
            if distributed:
                torch.distributed.all_reduce(totals)
            for batch, (ranked, tokens) in zip(step_batches, counts):
                scales = step_term_scales(ranked, tokens, totals[0].item(), totals[1].item(), len(step_batches), world)
                stats = _forward(engine, batch, t, teacher, scales)
                engine.backward(stats["loss"])
                engine.step()
                window.add({k: v.detach() for k, v in stats.items()}, batch)
            progress.step += 1
            if progress.step % t.log_every_steps == 0 or progress.step == plan.total_steps:
                entry = window.flush(progress.step, epoch, engine.get_lr()[0])
                progress.curve.append(entry)
                metrics.log(progress.step, entry)
                done = progress.step / plan.total_steps
                _log(rank, f"[train] step {progress.step}/{plan.total_steps} ({done:.0%}) epoch {epoch} {_fmt(entry)}")
            end_of_epoch = progress.step % plan.steps_per_epoch == 0
            before_end = progress.step < plan.total_steps
            checkpoint = before_end and ((t.checkpoint_every_steps and progress.step % t.checkpoint_every_steps == 0)
                                         or (not t.checkpoint_every_steps and end_of_epoch))
            # In stop mode every checkpoint follows an evaluation that passed, and every evaluation that
            # passes is checkpointed: the newest checkpoint is always the last good one.
            if before_end and ((t.eval_every_steps and progress.step % t.eval_every_steps == 0)
                               or (stop_mode and checkpoint)):
                figures = evaluate(engine, eval_batches, plan, teacher)
                progress.evals.append({"step": progress.step, **figures})
                metrics.log(progress.step, figures, prefix="heldout")
                _log(rank, f"[train] held-out pairs at step {progress.step}: {_fmt(figures)}")
                if _check_guard(engine, plan, progress, figures, rank) and stop_mode:
                    return
                checkpoint = checkpoint or stop_mode
            if checkpoint:
                _save(engine, progress, rank)
            if end_of_epoch or progress.step >= plan.total_steps:
                break


def _check_guard(engine, plan: TrainPlan, progress: Progress, figures: dict, rank: int) -> bool:
    """True when the held-out teacher-output log-prob fell past train.guard.max_logp_drop (ranks agree).

    Warns once; in stop mode restores the newest (last good) checkpoint and records where training ended.
    """
    guard = plan.train.guard
    initial = -progress.eval_initial["chosen_nll_per_token"]
    drop = initial - figures["teacher_logp_per_token"]
    tripped = guard.max_logp_drop is not None and figures["pairs"] > 0 and drop > guard.max_logp_drop
    if torch.distributed.is_initialized():  # every rank scored the same pairs; decide as one
        flag = torch.tensor([float(tripped)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        tripped = bool(flag.item())
    if not tripped:
        return False
    if progress.guard is None:
        progress.guard = {"step": progress.step, "initial_logp_per_token": initial,
                          "logp_per_token": figures["teacher_logp_per_token"], "max_logp_drop": guard.max_logp_drop,
                          "action": guard.action}
        _log(rank, f"[train] warning: held-out teacher-output log-prob per token fell {drop:.3f} nats "
                   f"({initial:.3f} -> {figures['teacher_logp_per_token']:.3f}) by step {progress.step}, more than "
                   f"train.guard.max_logp_drop={guard.max_logp_drop}: the student is getting less likely to write what "
                   f"the teacher writes" + ("; stopping at the last good checkpoint" if guard.action == "stop" else
                                            "; set train.guard.action=stop to end training at the last good checkpoint"))
    if guard.action == "stop":
        good = progress.last_checkpoint
        _restore(engine, plan, good)
        progress.guard.update(stopped_at_step=progress.step, restored_step=good)
        _log(rank, f"[train] restored the checkpoint of step {good}; training stops there")
    return True


def _restore(engine, plan: TrainPlan, step: int) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint(f"{plan.checkpoint_root}/{_checkpoint_name(step)}")
    with checkpoint.as_directory() as folder:
        engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)


def _steps(shard, t: TrainConfig, pad_id: int, epoch: int):
    """The epoch's optimizer steps, each its gradient_accumulation_steps micro-batches (in hand before
    the first forward: the step's totals normalise every micro-batch's loss)."""
    step = []
    for batch in _micro_batches(shard, t, pad_id, epoch):
        step.append(batch)
        if len(step) == t.gradient_accumulation_steps:
            yield step
            step = []


def _term_counts(batch: dict, t: TrainConfig) -> tuple[float, float]:
    """(ranking terms, chosen response tokens) of a micro-batch: the denominators of plad_loss's means
    (ranked pairs; listwise: prompts; the NLL and token KD: the teacher outputs' scored tokens)."""
    listwise = "rejected_mask" in batch
    b = batch["rejected_mask"].shape[0] if listwise else batch["input_ids"].shape[0] // 2
    ranked = b if listwise or t.loss.type == "listwise" or "ranked" not in batch else batch["ranked"].sum().item()
    return float(ranked), float(batch["response_mask"][:b, 1:].sum().item())


def _micro_batches(shard, t: TrainConfig, pad_id: int, epoch: int):
    """The shard's micro-batches for one epoch, length-grouped (seeded: a bucket always splits the
    same way; which rows a bucket holds is up to Ray Data, README "Resuming"). Listwise rows are
    whole prompts."""
    group = t.micro_batch_size * t.length_grouping
    collate = collate_groups if t.loss.type == "listwise" else collate_pairs
    for index, bucket in enumerate(shard.iter_batches(batch_size=group, batch_format="numpy")):
        for micro in length_grouped(bucket, t.micro_batch_size, seed=[t.seed, epoch, index]):
            yield collate(micro, pad_id)


def _forward(engine, batch: dict, t: TrainConfig, teacher=None, term_scales=(1.0, 1.0)) -> dict:
    """One forward of every sequence of the batch, then the objective. Rows: B chosen, then the rejected
    ones (B for pairs; B x K, prompt-major, for listwise groups with `rejected_mask` [B, K])."""
    device = engine.device
    input_ids_NT = batch["input_ids"].to(device)
    logits_NTV = engine(input_ids=input_ids_NT, attention_mask=batch["attention_mask"].to(device)).logits
    response_mask_NT = batch["response_mask"].to(device)
    logps_N, num_tokens_N = sequence_logps(logits_NTV, input_ids_NT, response_mask_NT)
    mask_BK = batch["rejected_mask"].to(device) if "rejected_mask" in batch else None
    b = mask_BK.shape[0] if mask_BK is not None else input_ids_NT.shape[0] // 2
    rejected_logps, rejected_tokens = logps_N[b:], num_tokens_N[b:]
    if mask_BK is not None:
        rejected_logps, rejected_tokens = rejected_logps.view(b, -1), rejected_tokens.view(b, -1)
    kd = None
    if teacher is not None:  # token_kd: on the chosen (teacher-written) rows only
        with torch.no_grad():
            teacher_logits_BTV = teacher(input_ids=input_ids_NT[:b],
                                         attention_mask=batch["attention_mask"][:b].to(device)).logits
        kd = token_kd_loss(logits_NTV[:b], teacher_logits_BTV, response_mask_NT[:b])
    return plad_loss(
        logps_N[:b], num_tokens_N[:b], rejected_logps, rejected_tokens,
        beta=t.loss.beta, length_normalize=t.loss.length_normalize, nll_weight=t.loss.nll_weight,
        loss_type=t.loss.type, gamma=t.loss.gamma,
        chosen_scores_B=batch["chosen_score"].to(device) if "chosen_score" in batch else None,
        rejected_scores_B=batch["rejected_score"].to(device) if "rejected_score" in batch else None,
        token_kd=kd, ranked_B=batch["ranked"].to(device) if "ranked" in batch else None, rejected_mask_BK=mask_BK,
        term_scales=term_scales,
    )


@torch.no_grad()
def evaluate(engine, batches: list[dict], plan: TrainPlan, teacher=None) -> dict:
    """Held-out pairs (each rank sees all): ranking accuracy, loss and margin over the pairs with a
    ranking signal, and the student's per-token NLL (= -log-prob) of every held-out teacher output."""
    engine.eval()
    totals = torch.zeros(7, dtype=torch.float64)  # pairs, ranked, correct, loss, margin sums, chosen NLL, tokens
    for batch in batches:
        stats = _forward(engine, batch, plan.train, teacher)
        n = batch["input_ids"].shape[0] // 2
        ranked = batch["ranked"].sum().item()
        chosen_tokens = batch["response_mask"][:n, 1:].sum().item()
        totals += torch.tensor([n, ranked, stats["accuracy"] * ranked, stats["rank_loss"] * ranked,
                                stats["margin"] * ranked, stats["nll"] * chosen_tokens, chosen_tokens],
                               dtype=torch.float64)
    engine.train()
    ranked = max(totals[1].item(), 1.0)
    nll = totals[5].item() / max(totals[6].item(), 1.0)
    return {"pairs": int(totals[0].item()), "ranked_pairs": int(totals[1].item()),
            "ranking_accuracy": totals[2].item() / ranked, "loss": totals[3].item() / ranked,
            "margin": totals[4].item() / ranked, "chosen_nll_per_token": nll, "teacher_logp_per_token": -nll}


def _checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _save(engine, progress: Progress, rank: int) -> None:
    import ray.train

    progress.last_checkpoint = progress.step
    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag=CHECKPOINT_TAG)
        if rank == 0:
            (Path(folder) / PROGRESS_FILE).write_text(json.dumps(progress.__dict__))
        ray.train.report(
            {"step": progress.step, **(progress.curve[-1] if progress.curve else {})},
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=_checkpoint_name(progress.step),
        )


class _Window:
    """Running means between two logged steps, and real (non-padding) token throughput."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0
        self.tokens = 0  # real (non-padding) tokens through forward and backward
        self.padded = 0
        self.start = time.perf_counter()

    def add(self, stats: dict, batch: dict) -> None:
        for key in ("loss", "rank_loss", "nll", "accuracy", "margin"):
            self.sums[key] = self.sums.get(key, 0.0) + float(stats[key])
        self.count += 1
        self.tokens += int(batch["attention_mask"].sum())
        self.padded += batch["attention_mask"].numel()

    def flush(self, step: int, epoch: int, lr: float) -> dict:
        seconds = time.perf_counter() - self.start
        entry = {"step": step, "epoch": epoch, "lr": lr, **{k: v / self.count for k, v in self.sums.items()},
                 "tokens": self.tokens, "seconds": seconds, "tokens_per_s": self.tokens / seconds if seconds else 0.0,
                 "padding": 1 - self.tokens / self.padded if self.padded else 0.0}
        self.__init__()
        return entry


def _log(rank: int, line: str) -> None:
    if rank == 0:
        print(line, flush=True)


def _fmt(stats: dict) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()
                    if k not in ("step", "epoch"))

