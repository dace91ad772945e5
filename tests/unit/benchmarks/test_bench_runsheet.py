"""The GPU run-sheet's arithmetic and wiring (benchmarks/): MFU, tokens per GPU, the plan lines, make's flags.
The benchmarks themselves run in `make bench-*`, never in tests."""

import subprocess

import pytest
from conftest import ROOT

from benchmarks import generation, scoring, training
from benchmarks.common import BENCH_MODELS, mfu, parameter_count, per_device


def test_mfu_is_6n_tokens_over_peak():
    # A 7B model at 1,000 tokens/s on one A100 (312 TFLOP/s bf16 dense): 6 * 7e9 * 1e3 / 312e12 = 13.46%.
    assert mfu(1000.0, 7_000_000_000, 312e12) == pytest.approx(0.134615, rel=1e-5)
    assert mfu(1000.0, 7_000_000_000, 312e12, devices=8) == pytest.approx(0.134615 / 8, rel=1e-5)
    assert mfu(1000.0, 7_000_000_000, None) is None
    assert per_device(800.0, 4) == 200.0 and per_device(800.0, None) is None


def test_parameters_are_counted_from_the_config_alone(tmp_path):
    from transformers import LlamaConfig

    shape = BENCH_MODELS["bench-4m"]
    h, i, layers, vocab = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], 300
    LlamaConfig(
        vocab_size=vocab,
        head_dim=64,
        num_key_value_heads=shape["num_attention_heads"],
        tie_word_embeddings=True,
        **shape,
    ).save_pretrained(tmp_path)  # config.json only, no weights
    # tied embedding once; per layer q, k, v, o (h x h each), gate, up, down (h x i each), two norms; final norm
    assert parameter_count(str(tmp_path)) == vocab * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h


def test_the_full_settings_say_what_they_will_run():
    assert generation.plan(generation.SETTINGS["full"]) == (
        "plan: 20,000 prompts of 512 tokens x up to 256 new tokens: at most 5,120,000 generated tokens per contender "
        "run; (b) at replicas 1 x 8 CPUs, 2 x 8 CPUs, 4 x 8 CPUs, 8 x 8 CPUs; bfloat16, GPUs"
    )
    assert scoring.plan(scoring.SETTINGS["full"]) == (
        "plan: 20,000 sequences of 512 prompt + 256 response tokens, top 20 log-probs per response token: about "
        "15,360,000 prefill tokens per contender run; bfloat16, GPUs"
    )
    assert training.plan(training.SETTINGS["full"], 494_032_768) == (
        "plan: 494.0M parameters; 300 steps (30 warm-up) x 8 pairs, chosen + rejected of up to 1024 tokens: at most "
        "4,915,200 tokens per contender, bf16, one GPU each"
    )


def test_make_passes_the_model_and_the_peak_through():
    dry = subprocess.run(
        ["make", "-n", "bench-training", "SETTING=full", "MODEL=/mnt/shared/models/Qwen2.5-0.5B", "PEAK_FLOPS=312e12"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "-m benchmarks.training --setting full --model /mnt/shared/models/Qwen2.5-0.5B --peak-flops 312e12" in dry
    dry = subprocess.run(
        ["make", "-n", "bench-generation", "SETTING=full", "MODEL=/m"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "-m benchmarks.generation --setting full --model /m" in dry
    assert "-m benchmarks.scoring --setting full --model /m" in dry
