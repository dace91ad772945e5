"""Config loading, overrides and validation; every shipped config must load and validate."""

import glob
import json
import os

import pytest
from support.configs import MINIMAL, write

from plad_ray.config import load_config
from plad_ray.errors import ConfigError

SHIPPED = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "*.yaml")))


def test_minimal_config_gets_defaults_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path, MINIMAL + "train: {pairs: p/pairs}\n"))
    assert cfg.train.loss.beta == 1.0 and cfg.train.zero_stage == 2 and cfg.student.num_samples == 1
    # Local paths are fixed against the launch directory: the job's cwd may not outlive the run.
    assert cfg.output_dir == str(tmp_path / "out") and cfg.data.prompts == str(tmp_path / "p.jsonl")
    assert cfg.train.pairs == str(tmp_path / "p" / "pairs")
    assert cfg.layout().pairs() == cfg.output_dir + "/pairs"
    uris = load_config(write(tmp_path, MINIMAL), ["data.prompts=s3://b/p.jsonl", "train.pairs=gs://b/pairs"])
    assert (uris.data.prompts, uris.train.pairs) == ("s3://b/p.jsonl", "gs://b/pairs")


def test_relative_output_dir_under_a_ray_job_goes_to_cluster_storage(tmp_path, monkeypatch):
    """Under `ray job submit --working-dir`, the launch directory is Ray's temporary copy of the working
    dir: inputs come from it, outputs never go there (README, Running on a cluster)."""
    monkeypatch.chdir(tmp_path)
    job = json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}})
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", job)
    cfg = load_config(write(tmp_path, MINIMAL), ["cluster.storage=/runs/root"])
    assert cfg.output_dir == "/runs/root/out" and cfg.data.prompts == str(tmp_path / "p.jsonl")
    # The default root is under the user's home; a URI root keeps its scheme; absolute paths and URIs stay.
    assert load_config(write(tmp_path, MINIMAL)).output_dir == os.path.expanduser("~/plad-ray-runs/out")
    assert load_config(write(tmp_path, MINIMAL), ["cluster.storage=s3://b/runs"]).output_dir == "s3://b/runs/out"
    assert load_config(write(tmp_path, MINIMAL), ["output_dir=/abs/out"]).output_dir == "/abs/out"
    assert load_config(write(tmp_path, MINIMAL), ["output_dir=gs://b/o"]).output_dir == "gs://b/o"
    # A job submitted without a working_dir, or no job at all: the launch directory, as before.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}}))
    assert load_config(write(tmp_path, MINIMAL)).output_dir == str(tmp_path / "out")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert load_config(write(tmp_path, MINIMAL)).output_dir == str(tmp_path / "out")
    with pytest.raises(ConfigError, match="cluster.storage"):
        load_config(write(tmp_path, MINIMAL), ["cluster.storage="])


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL),
        [
            "train.loss.beta=0.25",
            "student.num_samples=3",
            "train.learning_rate=1e-5",
            "cluster.address=null",
            "teacher.engine_kwargs={enforce_eager: true}",
            "output_dir=s3://bucket/run",
        ],
    )
    assert cfg.train.loss.beta == 0.25
    assert cfg.student.num_samples == 3
    assert cfg.train.learning_rate == 1e-5  # PyYAML reads "1e-5" as a string; numbers are accepted
    assert cfg.teacher.engine_kwargs == {"enforce_eager": True}
    assert cfg.output_dir == "s3://bucket/run"  # URIs stay as given


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.bogus=1", "config key train.bogus: unknown key"),
        (
            "student.endpoint.url=http://h/v1/completions",
            "config key student.endpoint: unknown key; valid keys at student",
        ),
        ("train.zero_stage=4", "config key train.zero_stage: must be a DeepSpeed ZeRO stage"),
        ("train.loss.beta=0", "config key train.loss.beta: the hinge margin must be > 0"),
        ("train.loss.beta=-1", "config key train.loss.beta: the hinge margin must be > 0"),
        ("train.num_workers=two", "config key train.num_workers: expected an integer, got 'two'"),
        ("train.precision=fp16", "config key train.precision: must be bf16 or fp32"),
        ("train.checkpoint_upload=later", "config key train.checkpoint_upload: must be async or sync"),
        ("train.offload_optimizer=true", "config key train.offload_optimizer: optimizer offload needs"),
        ("teacher.tensor_parallel_size=2", "config key teacher.tensor_parallel_size: tensor parallelism needs GPUs"),
        ("student.num_samples=0", "config key student.num_samples: must be >= 1"),
        ("teacher.max_concurrent_batches=0", "config key teacher.max_concurrent_batches: must be >= 1"),
        ("data.heldout_fraction=1.0", "config key data.heldout_fraction: must be in [0, 1)"),
        ("teacher.sampling.max_tokens=5000", "config key teacher.sampling.max_tokens: must be below"),
        ("train=3", "config key train: must be a section"),
        (
            "train.loss.type=ipo",
            "config key train.loss.type: must be one of: hinge, margin, logistic, listwise, dpo, seqkd, token_kd",
        ),
        ("train.rounds=0", "config key train.rounds: must be >= 1"),
        ("train.max_steps=0", "config key train.max_steps: must be >= 1 or null"),
        ("eval.scorer=rouge", "config key eval.scorer: must be null or one of: reverse"),
        ("eval.num_bins=0", "config key eval.num_bins: must be >= 1"),
        ("data.heldout_fraction=0", "config key eval.enabled: evaluation runs on held-out prompts"),
        ("train.loss.type=margin", "config key train.loss.type: the margin loss needs scores: set train.scorer"),
        ("train.loss.gamma=0", "config key train.loss.gamma: the logistic scale must be > 0"),
        ("train.loss.seqkd_first=1", "config key train.loss.seqkd_first: must be in [0, 1)"),
        (
            "train.loss.seqkd_first=0.5",  # the minimal config's objective is seqkd itself
            "config key train.loss.seqkd_first: goes before a ranking objective (hinge, margin, logistic, listwise, "
            "dpo)",
        ),
        ("train.scorer=rouge", "config key train.scorer: must be null or one of: reverse"),
        ("train.student_wins=flip", "config key train.student_wins: dropping or flipping pairs the student won"),
        ("nothing", "override 'nothing': must look like key.path=value"),
        (
            "train.attn_implementation=flash",
            "config key train.attn_implementation: must be null or one of: sdpa, eager, flash_attention_2",
        ),
        (
            "train.attn_implementation=flash_attention_2",
            "config key train.attn_implementation: flash_attention_2 runs on GPUs only (flash-attn's CUDA kernels)",
        ),
        ("train.checkpoint_staging_dir=s3://b/x", "config key train.checkpoint_staging_dir: must be a local folder"),
        ("cluster.model_cache=s3://b/models", "config key cluster.model_cache: must name a local folder"),
        ("student.gpus_per_worker=1.5", "config key student.gpus_per_worker: must be 1, or a fraction in (0, 1)"),
        (
            "student.gpus_per_worker=0.5",
            "config key student.gpu_memory_utilization: must be at most student.gpus_per_worker",
        ),
        (
            "teacher.endpoint={url: http://h/v1/completions, max_refused_fraction: 0}",
            "config key teacher.endpoint.max_refused_fraction: must be in (0, 1] (1: never stop)",
        ),
        (
            "teacher.endpoint={url: http://h/v1/completions, refused_window: 0}",
            "config key teacher.endpoint.refused_window: must be >= 1 (answers)",
        ),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, message):
    if override == "train.offload_optimizer=true":
        overrides = [override, "train.zero_stage=0"]
    else:
        overrides = [override]
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, MINIMAL), overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file .*nope.yaml: not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="line 2: not valid YAML"):
        load_config(write(tmp_path, "output_dir: x\n  bad: [\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_required_keys(tmp_path):
    with pytest.raises(ConfigError, match="config key output_dir: must name a folder"):
        load_config(write(tmp_path, "data: {prompts: p.jsonl}\n"))


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_configs_load_and_validate(path):
    cfg = load_config(path)
    assert cfg.teacher.model and cfg.student.model and cfg.data.prompts
    if cfg.cluster.use_gpu:
        # GPU cluster configs: the teacher must be at least as large a deployment as the student.
        assert cfg.teacher.tensor_parallel_size >= cfg.student.tensor_parallel_size
        assert cfg.train.precision == "bf16"


def test_at_least_two_gpu_cluster_configs():
    gpu = [p for p in SHIPPED if load_config(p).cluster.use_gpu]
    assert len(gpu) >= 2, gpu


def test_quality_benchmark_config_is_valid_with_every_methods_overrides():
    from benchmarks.quality.methods import METHODS
    from benchmarks.quality.run import CONFIG

    assert len({m.name for m in METHODS}) == len(METHODS)
    for method in METHODS:
        scores = ["train.teacher_scores=x/teacher_scores"] if method.scored else []  # as run.run_method gives them
        cfg = load_config(
            str(CONFIG),
            [
                "data.prompts=p.jsonl",
                "student.model=s",
                "teacher.model=t",
                "train.pairs=x.parquet",
                *scores,
                "train.max_steps=120",
                *method.overrides,
            ],
        )
        assert cfg.eval.scorer == "tiny_exact" and cfg.train.max_steps == 120 and cfg.data.heldout_fraction > 0
        # Three epochs, so train.max_steps ends every method: the hinge without NLL drops identical pairs and
        # had 58 steps in one epoch on seed 0 (928 pairs).
        assert cfg.train.num_epochs == 3 and cfg.student.num_samples == 4
        # The same pairs per optimizer step for every method: 16 (listwise: 4 prompts x 4 samples).
        pairs_per_step = cfg.train.micro_batch_size * (
            cfg.student.num_samples if cfg.train.loss.type == "listwise" else 1
        )
        assert pairs_per_step == 16, method.name


def test_lr_schedule_is_transformers_linear_one_step_ahead():
    """plad_ray's linear schedule (ds_config.lr_factor) is transformers' get_linear_schedule_with_warmup one step
    ahead during warm-up, and the same decay after: it never spends a step at learning rate 0."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from plad_ray.train.ds_config import lr_factor

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for warmup, total in ((5, 55), (0, 10), (3, 4)):
        theirs = get_linear_schedule_with_warmup(optimizer, warmup, total).lr_lambdas[0]
        ours = [lr_factor(step, warmup, total) for step in range(total)]
        assert ours[:warmup] == pytest.approx([theirs(step + 1) for step in range(warmup)])
        assert ours[warmup:] == pytest.approx([theirs(step) for step in range(warmup, total)])
        assert all(lr > 0 for lr in ours) and theirs(0) == (0.0 if warmup else 1.0)
