"""token_kd's preconditions a GPU cluster would otherwise find the hard way: the frozen teacher sits on the
worker's device, teacher and student logits have one width, and (for every objective that reads teacher
token ids) each id the teacher's tokenizer can write has a student embedding row."""

import pytest
import torch

from plad_ray.errors import ConfigError


def model_folder(path, vocab_size: int) -> str:
    """A folder with the tiny byte tokenizer and a config of `vocab_size` embedding rows (no weights:
    the check reads only tokenizers and configs)."""
    from transformers import LlamaConfig

    from plad_ray.models import tiny

    tiny.build_tokenizer().save_pretrained(path)
    LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1
    ).save_pretrained(path)
    return str(path)


def test_token_kd_refuses_a_padded_vocabulary_with_one_line(tmp_path):
    from plad_ray.checks import check_shared_vocabulary

    student = model_folder(tmp_path / "student", 261)
    check_shared_vocabulary(model_folder(tmp_path / "same", 261), student)  # one tokenizer, one width: fine
    with pytest.raises(ConfigError) as err:
        check_shared_vocabulary(model_folder(tmp_path / "padded", 320), student)
    message = str(err.value)
    assert "\n" not in message and message.startswith("config key train.loss.type: token_kd needs logits of one width")
    assert "the teacher has 320 embedding rows and the student 261" in message


def test_the_frozen_teacher_is_moved_to_the_workers_device(tmp_path):
    from transformers import LlamaForCausalLM

    from plad_ray.config import LossConfig, TrainConfig
    from plad_ray.train import worker
    from plad_ray.train.plan import TrainPlan

    folder = model_folder(tmp_path / "teacher", 261)
    config = LlamaForCausalLM.config_class.from_pretrained(folder)
    LlamaForCausalLM(config).save_pretrained(folder)
    plan = TrainPlan(
        train=TrainConfig(loss=LossConfig(type="token_kd")),
        model_path=folder,
        export_uri="",
        tracking=None,
        steps_per_epoch=1,
        pad_id=0,
        teacher_path=folder,
    )
    # "meta" stands in for a GPU here: a device other than the CPU the weights load on.
    teacher = worker._load_teacher(plan, torch.device("meta"))
    assert {p.device.type for p in teacher.parameters()} == {"meta"}
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert worker._load_teacher(plan.__class__(**{**plan.__dict__, "train": TrainConfig()}), "cpu") is None


def test_teacher_token_ids_must_have_student_rows(tmp_path):
    from plad_ray.checks import check_teacher_ids_fit

    # The Qwen2.5-7B -> 0.5B shape: one tokenizer (here the tiny one, 259 tokens) on embeddings padded to
    # different heights (here 320 and 264): every id the teacher can write has a student row.
    teacher = model_folder(tmp_path / "teacher", 320)
    check_teacher_ids_fit(teacher, model_folder(tmp_path / "student", 264), "teacher.score_samples")
    check_teacher_ids_fit(teacher, model_folder(tmp_path / "exact", 259), "teacher.score_samples")
    narrow = model_folder(tmp_path / "narrow", 256)  # ids 256, 257 and 258 would index past its logits
    with pytest.raises(ConfigError) as err:
        check_teacher_ids_fit(teacher, narrow, "train.loss.type")
    message = str(err.value)
    assert "\n" not in message and message.startswith("config key train.loss.type: the teacher's tokenizer")
    assert (
        f"holds 259 tokens but the student ({narrow}) has 256 embedding rows, so teacher token ids 256 and up"
        in message
    )
