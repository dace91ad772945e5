"""Every DeepSpeed path the configs expose trains like the plain one (ZeRO-0, micro-batch 16, no
offload), on the same pairs and seed, 2 ranks on gloo: per-step losses over 12 steps and final fp32
weights (tests/training_paths.py runs the worker's own loop). Also: max_steps stops exactly there,
and the ZeRO-3 export equals the gathered fp32 weights and loads in vLLM.

Tolerances are stated per path. In fp32 the paths differ only in the order of floating-point sums
(partitioned reductions, the offloaded CPU Adam), so they must agree to rounding: measured
<= 4.3e-6 relative in the loss and <= 2.4e-6 in any weight (bounds: 1e-5 and 1e-5). bf16 rounds
every forward and Adam's first steps move every weight by about the learning rate whatever the
gradient's size, so on a model this small bf16 runs drift apart: measured 9.2e-2 (bf16 vs fp32)
and 2.3e-1 (ZeRO-3 + accumulation vs ZeRO-0, both bf16) in the loss, and a mean weight difference of
33-46% of the mean distance the weights moved. Their bounds (0.3; 60%) catch a path that trains
something else, not rounding; the fp32 rows are the exact check of each mechanism.
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import PYTHON, ROOT, job_env

pytestmark = pytest.mark.integration

# (variant, plain path it must match, max relative loss difference per step, weight bound):
# fp32 rows bound the largest weight difference; bf16 rows the mean weight difference as a share of
# the mean distance the plain path's weights moved.
EQUIVALENT = [
    ("zero1", "zero0", 1e-5, 1e-5),
    ("zero2", "zero0", 1e-5, 1e-5),
    ("zero3", "zero0", 1e-5, 1e-5),
    ("accumulation", "zero0", 1e-5, 1e-5),  # micro 8 x accumulation 2 vs micro 16 x 1
    ("offload", "zero0", 1e-5, 1e-5),  # ZeRO-2 with DeepSpeed's CPU Adam vs torch AdamW
    ("bf16", "zero0", 0.3, 0.6),
    ("zero3_accumulation_bf16", "bf16", 0.3, 0.6),  # the LLaMA-2 config's combination
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models) -> Path:
    out = tmp_path_factory.mktemp("training-paths")
    subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "tests.training_paths", str(out)], cwd=ROOT, env=job_env(), check=True, timeout=1200)
    return out


def results(runs: Path) -> dict:
    return json.loads((runs / "results.json").read_text())


@pytest.mark.parametrize("variant,plain,loss_tol,weight_tol", EQUIVALENT, ids=[v[0] for v in EQUIVALENT])
def test_training_path_matches_the_plain_path(runs, variant, plain, loss_tol, weight_tol):
    got, want = results(runs)[variant], results(runs)[plain]
    assert got["steps"] == want["steps"] == 12 and got["engine_steps"] == 12
    assert len(got["losses"]) == len(want["losses"]) == 12
    diffs = [abs(a - b) / abs(b) for a, b in zip(got["losses"], want["losses"])]
    print(f"{variant} vs {plain}: max relative loss difference {max(diffs):.2e}")
    assert max(diffs) <= loss_tol, (variant, got["losses"], want["losses"])
    assert want["losses"][-1] < want["losses"][0]  # the runs compared did train
    a, b = torch.load(runs / f"{variant}.pt"), torch.load(runs / f"{plain}.pt")
    initial = torch.load(runs / "initial.pt")
    assert a.keys() == b.keys() == initial.keys()
    if "bf16" not in variant:
        weight_diff = max((a[k] - b[k]).abs().max().item() for k in a)
        moved = max((b[k] - initial[k]).abs().max().item() for k in b)
        print(f"{variant} vs {plain}: max weight difference {weight_diff:.2e} (weights moved up to {moved:.2e})")
        assert weight_diff <= weight_tol and moved > 100 * weight_tol
    else:
        weight_diff = sum((a[k] - b[k]).abs().mean().item() for k in a) / len(a)
        moved = sum((b[k] - initial[k]).abs().mean().item() for k in b) / len(b)
        print(f"{variant} vs {plain}: mean weight difference {weight_diff:.2e}, {weight_diff / moved:.0%} of the "
              f"mean distance moved ({moved:.2e})")
        assert weight_diff <= weight_tol * moved


def test_every_rank_consumes_each_of_its_pairs_once_per_epoch(runs):
    for variant, record in results(runs).items():
        if variant == "max_steps":
            continue
        consumed = [pair for rank in record["consumed"] for pair in rank]
        assert len(consumed) == len(set(consumed)) == 12 * 16 * 2, variant


def test_max_steps_stops_exactly_there(runs):
    record = results(runs)["max_steps"]
    assert record["steps"] == record["engine_steps"] == 7 and len(record["losses"]) == 7
    assert [len(rank) for rank in record["consumed"]] == [7 * 16, 7 * 16]
    # The same start as the 12-step run; after it the lr schedule differs (it decays to 0 over 7 steps).
    assert record["losses"][0] == results(runs)["zero0"]["losses"][0]


def test_zero3_export_is_the_gathered_fp32_weights_and_loads_in_vllm(runs):
    from safetensors.torch import load_file

    export = runs / "zero3-export"
    assert (export / "_manifest.json").is_file()
    saved = load_file(str(export / "model.safetensors"))
    gathered = torch.load(runs / "zero3.pt")
    tied = set(gathered) - set(saved)  # tied embeddings are saved once
    assert saved.keys() <= gathered.keys() and all("lm_head" in k or "embed" in k for k in tied)
    for name, tensor in saved.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, gathered[name]), name
    script = (f"from vllm import LLM, SamplingParams\n"
              f"if __name__ == '__main__':\n"
              f"    llm = LLM({str(export)!r}, dtype='float32', max_model_len=64, enforce_eager=True,"
              f" kv_cache_memory_bytes=64 << 20)\n"
              f"    out = llm.generate(['abc>'], SamplingParams(temperature=0, max_tokens=4))\n"
              f"    print('GENERATED', len(out[0].outputs[0].token_ids))\n")
    done = subprocess.run([PYTHON, "-c", script], cwd=ROOT, env=job_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "GENERATED" in done.stdout
