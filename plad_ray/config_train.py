"""The train section of a run's config (`train:`): the trainer, its loss (`train.loss`) and its collapse guard
(`train.guard`), each checking its own fields as plad_ray.config's sections do."""

from dataclasses import dataclass, field, replace

from plad_ray.data import storage
from plad_ray.objectives import LOSS_TYPES, Objective, objective
from plad_ray.staleness import OPERATIONAL
from plad_ray.tracking import TRACKERS
from plad_ray.verifiers import POLICIES, SCORERS, TEACHER

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
ATTENTION = ("sdpa", "eager", "flash_attention_2")  # transformers' attn_implementation values plad-ray accepts


@dataclass
class LossConfig:
    type: str = "seqkd"  # an objective of plad_ray.objectives; which to pick: README "Choosing the objective"
    beta: float = 1.0  # hinge margin, > 0: nats of sequence log-prob; nats per token with length_normalize; dpo: its β
    gamma: float = 1.0  # logistic scale, > 0: -log sigmoid(gamma * (log P(chosen) - log P(rejected)))
    length_normalize: bool = False  # use mean token log-prob instead of the sum (beta becomes a per-token margin)
    # lambda of the lambda * NLL(chosen) anchor, >= 0 (0 is off). On by default: without it a ranking loss can
    # win by making the teacher's outputs less likely too (README "Choosing the objective").
    nll_weight: float = 1.0
    # onpolicy_kd: per-token divergence on the student's samples over the teacher's top-k plus the rest:
    # reverse_kl KL(S||T), forward_kl KL(T||S) or jsd (GKD's generalised JSD with jsd_beta)
    divergence: str = "reverse_kl"
    jsd_beta: float = 0.5  # in (0, 1)
    skew_alpha: float = 0.1  # contrastive: DistiLLM-2's skew, in [0, 1)
    # The paper's recipe, SFT first: this share of the optimizer steps, at the start, trains seqkd (the NLL of the
    # teacher's outputs), the rest this ranking objective; in [0, 1), 0 is off (one objective throughout)
    seqkd_first: float = 0.0

    def checks(self, prefix: str):
        yield f"{prefix}type", self.type in LOSS_TYPES, f"must be one of: {', '.join(LOSS_TYPES)}"
        yield f"{prefix}divergence", self.divergence in DIVERGENCES, f"must be one of: {', '.join(DIVERGENCES)}"
        yield f"{prefix}jsd_beta", 0 < self.jsd_beta < 1, "must be in (0, 1)"
        yield f"{prefix}skew_alpha", 0 <= self.skew_alpha < 1, "must be in [0, 1)"
        yield f"{prefix}beta", self.beta > 0, "the hinge margin must be > 0"
        yield f"{prefix}gamma", self.gamma > 0, "the logistic scale must be > 0"
        yield f"{prefix}nll_weight", self.nll_weight >= 0, "must be >= 0"
        yield (
            f"{prefix}seqkd_first",
            0 <= self.seqkd_first < 1,
            "must be in [0, 1): the share of steps trained as seqkd",
        )
        yield (
            f"{prefix}seqkd_first",
            not self.seqkd_first or self.type not in LOSS_TYPES or self.objective.trains_ranking,
            f"goes before a ranking objective (hinge, margin, logistic, listwise, dpo), not {self.type}",
        )

    @property
    def objective(self) -> Objective:
        """What this loss type trains, reads and needs (plad_ray.objectives)."""
        return objective(self.type)

    def seqkd_steps(self, total_steps: int) -> int:
        """How many of the run's first optimizer steps train seqkd (`seqkd_first`, rounded to the nearest step)."""
        return round(self.seqkd_first * total_steps)

    def at_step(self, step: int, total_steps: int) -> "LossConfig":
        """The loss optimizer step `step` (0-based) trains: seqkd during the `seqkd_first` share, then this one."""
        return replace(self, type="seqkd") if step < self.seqkd_steps(total_steps) else self


@dataclass
class GuardConfig:
    # Collapse guard: the held-out teacher outputs' log-prob per token, scored every train.eval_every_steps,
    # may fall at most this many nats below its value before training; null: no guard
    max_logp_drop: float | None = 0.1
    action: str = "warn"  # warn (one warning line, flagged in the summary) | stop (end training, export the last
    # checkpoint that passed; every checkpoint is then taken right after a held-out evaluation that passed)

    def checks(self, prefix: str):
        yield (
            f"{prefix}max_logp_drop",
            self.max_logp_drop is None or self.max_logp_drop >= 0,
            ("must be >= 0 nats per token, or null for no guard"),
        )
        yield f"{prefix}action", self.action in ("warn", "stop"), "must be warn or stop"


@dataclass
class TrainConfig:
    pairs: str | None = None  # pairs to train on (Parquet with TRL's prompt/chosen/rejected); None: output_dir/pairs
    # the teacher's scores of train.pairs: the teacher_scores/ folder of the run that made them (teacher.score_samples),
    # for train.scorer=teacher and the top-k objectives on given pairs (a teacher scores once, many students train)
    teacher_scores: str | None = None
    num_workers: int = 1  # Ray Train workers, one DeepSpeed rank each
    cpus_per_worker: float = field(default=1.0, metadata=OPERATIONAL)  # logical CPUs Ray reserves per worker
    # PACK (fill nodes; fast collectives) | SPREAD (one per node where possible)
    placement_strategy: str = field(default="PACK", metadata=OPERATIONAL)
    zero_stage: int = 2  # DeepSpeed ZeRO stage: 0, 1, 2 or 3
    precision: str = "bf16"  # bf16 (fp32 master weights) | fp32
    offload_optimizer: bool = False  # keep optimizer states on CPU (ZeRO-Offload); needs zero_stage >= 1
    micro_batch_size: int = 8  # pairs per worker per step (each pair is 2 sequences in one forward)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    length_grouping: int = 16  # sort each run of this many micro-batches by length (less padding); 1: off
    # lay each micro-batch's sequences end to end in fewer rows for the forward (position ids restart per
    # sequence; the same log-probs, less padding: plad_ray/train/packing.py); the held-out scoring stays unpacked
    packing: bool = field(default=False, metadata=OPERATIONAL)
    num_epochs: int = 1  # passes over the training pairs
    # train while the student engines make the pairs (README "Streaming"): their stream is the trainer's dataset,
    # the held-out prompts' pairs first; every pair is written to pairs/ before a rank reads it. Engines and
    # trainer workers run at once, so both must fit the cluster together. No checkpoint mid-stream; epochs after
    # the first read pairs/ from disk
    stream: bool = False
    max_steps: int | None = None  # stop after this many optimizer steps (fixed budgets across methods); None: no cap
    # PLaD rounds: round r > 1 samples round r-1's student again and trains it (outputs under output_dir/round-<r>/);
    # more rounds continue a finished run, its earlier rounds kept
    rounds: int = field(default=1, metadata=OPERATIONAL)
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up, in optimizer steps
    max_length: int = 1024  # prompt + response tokens; longer responses are cut, longer prompts dropped
    # the student's attention kernel (transformers' attn_implementation): sdpa | eager | flash_attention_2 (GPUs
    # with flash-attn installed; train.packing then runs its varlen kernels); null: transformers' default
    attn_implementation: str | None = field(default=None, metadata=OPERATIONAL)
    # recompute activations in backward: less memory, about a third more compute
    gradient_checkpointing: bool = field(default=False, metadata=OPERATIONAL)
    # local folder where each rank writes a checkpoint before Ray Train uploads it to output_dir/train (and deletes
    # it); null: the system's temp folder. Give a large local disk for big models
    checkpoint_staging_dir: str | None = field(default=None, metadata=OPERATIONAL)
    checkpoint_every_steps: int = field(default=0, metadata=OPERATIONAL)  # 0: checkpoint only at the end of each epoch
    # async: uploaded in the background while training goes on | sync: the ranks wait (guard.action=stop always does)
    checkpoint_upload: str = field(default="async", metadata=OPERATIONAL)
    log_every_steps: int = field(default=10, metadata=OPERATIONAL)  # optimizer steps between logged losses
    # times Ray Train restarts failed workers from the last checkpoint; -1: no limit
    max_failures: int = field(default=0, metadata=OPERATIONAL)
    eval_every_steps: int = 50  # score the held-out pairs every N optimizer steps (and before/after); 0: only then
    # score outputs with this plad_ray.verifiers scorer (e.g. reverse), or `teacher`: the teacher's mean log-prob per
    # token of each side, from teacher_scores/ (needs teacher.score_samples); null: none
    scorer: str | None = None
    student_wins: str = "keep"  # pairs where the student's output scored higher: keep | drop | flip
    # experiment trackers: tensorboard (output_dir/train/tensorboard), mlflow ($MLFLOW_TRACKING_URI), wandb
    # ($WANDB_API_KEY or WANDB_MODE=offline); [] for none. Credentials only from the environment (plad_ray/tracking.py)
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"], metadata=OPERATIONAL)
    # the MLflow experiment and the W&B project the runs go to
    experiment: str = field(default="plad-ray", metadata=OPERATIONAL)
    seed: int = 0
    loss: LossConfig = field(default_factory=LossConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def stream_checks(self, prefix: str):
        """What train.stream cannot do (yet), each with its way out."""
        if not self.stream:
            return
        off = f"or set {prefix}stream=false"
        yield (
            f"{prefix}stream",
            self.pairs is None,
            f"streams the run's own student engines; with {prefix}pairs "
            f"there is nothing to generate: set {prefix}stream=false",
        )
        yield (
            f"{prefix}stream",
            not self.loss.objective.groups_samples,
            (f"listwise groups need every sample of a prompt in one row, which a stream does not have: {off}"),
        )
        yield (
            f"{prefix}stream",
            self.scorer != TEACHER and not self.loss.objective.reads_topk,
            (
                f"the teacher scores the pairs after they are written; {prefix}scorer=teacher and the top-k objectives "
                f"need those scores before training: {off}"
            ),
        )
        yield (
            f"{prefix}stream",
            self.max_failures == 0,
            (f"a restarted worker group would read the stream again: set {prefix}max_failures=0 {off}"),
        )
        yield (
            f"{prefix}stream",
            self.guard.action != "stop",
            (
                "guard.action=stop restores checkpoints, and a streamed epoch takes none: "
                f"set {prefix}guard.action=warn {off}"
            ),
        )

    def checks(self, prefix: str):
        yield f"{prefix}num_workers", self.num_workers >= 1, "must be >= 1"
        yield f"{prefix}cpus_per_worker", self.cpus_per_worker > 0, "must be > 0"
        yield (
            f"{prefix}placement_strategy",
            self.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
            "must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD",
        )
        yield f"{prefix}zero_stage", self.zero_stage in (0, 1, 2, 3), "must be a DeepSpeed ZeRO stage: 0, 1, 2 or 3"
        yield f"{prefix}precision", self.precision in ("bf16", "fp32"), "must be bf16 or fp32"
        yield (
            f"{prefix}offload_optimizer",
            not self.offload_optimizer or self.zero_stage >= 1,
            (f"optimizer offload needs {prefix}zero_stage >= 1"),
        )
        yield f"{prefix}micro_batch_size", self.micro_batch_size >= 1, "must be >= 1"
        yield f"{prefix}gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, "must be >= 1"
        yield f"{prefix}length_grouping", self.length_grouping >= 1, "must be >= 1 (1 turns it off)"
        yield f"{prefix}num_epochs", self.num_epochs >= 1, "must be >= 1"
        yield f"{prefix}learning_rate", self.learning_rate > 0, "must be > 0"
        yield f"{prefix}weight_decay", self.weight_decay >= 0, "must be >= 0"
        yield f"{prefix}warmup_steps", self.warmup_steps >= 0, "must be >= 0"
        yield f"{prefix}max_length", self.max_length >= 2, "must be >= 2"
        yield (
            f"{prefix}attn_implementation",
            self.attn_implementation in (None, *ATTENTION),
            (f"must be null or one of: {', '.join(ATTENTION)}"),
        )
        yield (
            f"{prefix}checkpoint_staging_dir",
            self.checkpoint_staging_dir is None or not storage.is_uri(self.checkpoint_staging_dir),
            "must be a local folder (Ray Train uploads from it to output_dir)",
        )
        yield f"{prefix}checkpoint_every_steps", self.checkpoint_every_steps >= 0, "must be >= 0"
        yield f"{prefix}checkpoint_upload", self.checkpoint_upload in ("async", "sync"), "must be async or sync"
        yield f"{prefix}log_every_steps", self.log_every_steps >= 1, "must be >= 1"
        yield f"{prefix}max_failures", self.max_failures >= -1, "must be >= 0, or -1 for no limit"
        yield from self.loss.checks(f"{prefix}loss.")
        yield f"{prefix}max_steps", self.max_steps is None or self.max_steps >= 1, "must be >= 1 or null"
        yield f"{prefix}rounds", self.rounds >= 1, "must be >= 1"
        yield from self.stream_checks(prefix)
        yield (
            f"{prefix}rounds",
            self.rounds == 1 or self.pairs is None,
            (f"later rounds regenerate student samples; they cannot start from external {prefix}pairs"),
        )
        yield (
            f"{prefix}teacher_scores",
            self.teacher_scores is None or self.pairs is not None,
            (f"scores of given pairs: set {prefix}pairs too (a run's own pairs use its teacher.score_samples)"),
        )
        yield (
            f"{prefix}scorer",
            self.scorer is None or self.scorer in (*SCORERS, TEACHER),
            (f"must be null or one of: {', '.join((*SCORERS, TEACHER))}"),
        )
        yield (
            f"{prefix}loss.type",
            not self.loss.objective.needs_scores or self.scorer is not None,
            (f"the margin loss needs scores: set {prefix}scorer"),
        )
        yield f"{prefix}student_wins", self.student_wins in POLICIES, f"must be one of: {', '.join(POLICIES)}"
        yield (
            f"{prefix}student_wins",
            self.student_wins == "keep" or self.scorer is not None,
            (f"dropping or flipping pairs the student won needs scores: set {prefix}scorer"),
        )
        yield (
            f"{prefix}eval_every_steps",
            self.eval_every_steps >= 0,
            ("must be >= 0 (0: only before and after training)"),
        )
        yield from self.guard.checks(f"{prefix}guard.")
        yield (
            f"{prefix}trackers",
            set(self.trackers) <= set(TRACKERS),
            (
                f"unknown tracker {sorted(set(self.trackers) - set(TRACKERS))[0]!r}; choose from: {', '.join(TRACKERS)}"
                if set(self.trackers) - set(TRACKERS)
                else ""
            ),
        )
        yield f"{prefix}trackers", len(set(self.trackers)) == len(self.trackers), "lists a tracker twice"
        yield f"{prefix}experiment", bool(self.experiment.strip()), "must name the MLflow experiment / W&B project"
