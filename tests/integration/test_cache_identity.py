"""A re-run after the prompt source changed, for real (vLLM teacher and student on a local Ray cluster):
appended prompts extend pairs/, and a row inserted at the top of an id-less source is refused."""

import json
import subprocess

import pytest
from support.jobs import run_job

from plad_ray.data import parquet
from plad_ray.models import tiny

pytestmark = pytest.mark.integration


def generate(source, out) -> subprocess.CompletedProcess:
    return run_job("generate_pairs", f"output_dir={out}", f"data.prompts={source}")


def write(source, words) -> None:
    source.write_text("".join(json.dumps({"prompt": f"{w}>"}) + "\n" for w in words))


# make test-slow (its three runs took 320 s of make test): the refusal is the Ray Data join that
# test_prompt_checks.py::test_cached_teacher_outputs_must_match_the_prompt_text_of_their_id runs for real, and
# generating only the missing keys is the anti-join of test_resume_keys.py and the Ctrl-C resume test.
@pytest.mark.slow
def test_appended_prompts_extend_the_pairs_and_an_insertion_is_refused(tiny_models, tmp_path):
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 8))) for _ in range(20)]
    assert len(set(words)) == 20  # so the insertion below shifts every id onto another text
    source, out = tmp_path / "prompts.jsonl", tmp_path / "run"
    write(source, words[:16])
    first = generate(source, out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert parquet.read_table(str(out / "pairs")).num_rows == 16 * 2

    # Four prompts appended to the same file: the teacher answers only them, and pairs/ grows by 4 x 2.
    write(source, words)
    second = generate(source, out)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "teacher: 4 prompts to generate (16 cached)" in second.stdout
    assert "the teacher cache has 4 more prompts: adding 8 pairs" in second.stdout
    assert "pairs: added 8 pairs to the 32 already committed" in second.stdout
    table = parquet.read_table(str(out / "pairs"))
    keys = list(zip(table.column("id").to_pylist(), table.column("sample_index").to_pylist()))
    assert len(keys) == len(set(keys)) == 20 * 2
    # Every pair answers its own prompt: the tiny teacher reverses it (greedy), and the prompt is the source's.
    texts = {f"p{i:07d}": f"{w}>" for i, w in enumerate(words)}
    for r in table.to_pylist():
        assert r["prompt"] == texts[r["id"]]
    right = sum(r["chosen"] == tiny.reversal_answer(r["prompt"]) for r in table.to_pylist())
    assert right / table.num_rows > 0.9

    # A row inserted at the top: every id now names the previous row's text. Refused in one line, nothing
    # rewritten.
    manifest = (out / "pairs" / "_manifest.json").read_text()
    write(source, ["zzz"] + words)
    third = generate(source, out)
    assert third.returncode == 3, third.stdout[-3000:] + third.stderr[-3000:]
    line = f"prompt source {source}: 20 prompt id(s) now name another text than their cached teacher output"
    assert line in third.stderr and "Traceback" not in third.stderr
    assert (out / "pairs" / "_manifest.json").read_text() == manifest
