"""Which parts of an output folder a re-run reuses, refuses, or replaces (plad_ray.outputs)."""

import pytest

from plad_ray.config import load_config
from plad_ray.errors import ConfigError
from plad_ray.outputs import prepare_output

CONFIG = """
output_dir: {out}
data: {{prompts: p.jsonl}}
teacher: {{model: tiny:teacher}}
student: {{model: tiny:student}}
"""


def make(tmp_path, *overrides):
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.format(out=tmp_path / "run"))
    return load_config(str(path), list(overrides))


def touch_outputs(run):
    for name in ("teacher", "pairs", "train", "student"):
        (run / name).mkdir(parents=True, exist_ok=True)
    (run / "report.json").write_text("{}")


def test_same_config_and_speed_settings_resume(tmp_path):
    prepare_output(make(tmp_path))
    touch_outputs(tmp_path / "run")
    # Replicas, batch size and cluster settings change speed, not outputs.
    prepare_output(
        make(
            tmp_path,
            "teacher.replicas=4",
            "student.batch_size=8",
            "cluster.num_cpus=8",
            "teacher.max_concurrent_batches=2",
        )
    )
    assert (tmp_path / "run" / "teacher").exists() and (tmp_path / "run" / "report.json").exists()


def test_operational_training_settings_resume(tmp_path):
    # More restarts after a crash, another logging, checkpoint or tracker cadence: the same weights, so the run
    # resumes (before, the changed train.max_failures refused it, and --overwrite deleted the checkpoints).
    prepare_output(make(tmp_path, "train.max_failures=0"))
    touch_outputs(tmp_path / "run")
    prepare_output(
        make(
            tmp_path,
            "train.max_failures=3",
            "train.log_every_steps=1",
            "train.checkpoint_every_steps=7",
            "train.trackers=[]",
            "train.cpus_per_worker=2",
            "train.placement_strategy=SPREAD",
            "train.packing=true",
            "train.gradient_checkpointing=true",
            "train.attn_implementation=eager",
            f"train.checkpoint_staging_dir={tmp_path / 'staging'}",
        )
    )
    assert all((tmp_path / "run" / name).exists() for name in ("train", "student", "report.json"))
    # A run.json written before these keys were left out still resumes.
    import json

    run_json = tmp_path / "run" / "run.json"
    keys = json.loads(run_json.read_text())
    keys["train"]["train"]["max_failures"] = 0
    run_json.write_text(json.dumps(keys))
    prepare_output(make(tmp_path, "train.max_failures=5"))
    assert (tmp_path / "run" / "train").exists()
    # A setting that changes the weights still refuses.
    with pytest.raises(ConfigError, match=r"train.seed: 0 -> 1"):
        prepare_output(make(tmp_path, "train.seed=1"))


def test_a_run_recorded_before_a_key_existed_resumes_while_the_key_keeps_its_default(tmp_path):
    # run.json from an older plad-ray: no train.loss.divergence, no train.teacher_scores.
    import json

    prepare_output(make(tmp_path))
    touch_outputs(tmp_path / "run")
    run_json = tmp_path / "run" / "run.json"
    keys = json.loads(run_json.read_text())
    del keys["train"]["train"]["loss"]["divergence"], keys["train"]["train"]["teacher_scores"]
    run_json.write_text(json.dumps(keys))
    prepare_output(make(tmp_path))
    assert (tmp_path / "run" / "train").exists()
    assert json.loads(run_json.read_text())["train"]["train"]["loss"]["divergence"] == "reverse_kl"  # recorded now
    run_json.write_text(json.dumps(keys))
    # The new key set to something else than its default did change the run.
    with pytest.raises(ConfigError, match=r"train.loss.divergence: None -> 'jsd'"):
        prepare_output(make(tmp_path, "train.loss.divergence=jsd"))


def test_changed_training_config_refused_then_replaced_keeping_pairs(tmp_path):
    prepare_output(make(tmp_path))
    touch_outputs(tmp_path / "run")
    with pytest.raises(
        ConfigError, match=r"its train outputs were made with a different config \(train.loss.beta: 1.0 -> 0.5\)"
    ):
        prepare_output(make(tmp_path, "train.loss.beta=0.5"))
    prepare_output(make(tmp_path, "train.loss.beta=0.5"), overwrite=True, log=lambda _: None)
    run = tmp_path / "run"
    assert (run / "teacher").exists() and (run / "pairs").exists()
    assert not (run / "train").exists() and not (run / "student").exists() and not (run / "report.json").exists()
    prepare_output(make(tmp_path, "train.loss.beta=0.5"))  # now the same run: resumes


def test_changed_keys_of_a_stage_with_no_outputs_are_just_recorded(tmp_path):
    # A generation-only run records train keys too; a training config that differs, before anything was
    # trained, has nothing stale to refuse or remove (the quality benchmark's generation folders).
    prepare_output(make(tmp_path))
    run = tmp_path / "run"
    for name in ("teacher", "pairs"):
        (run / name).mkdir(parents=True)
    prepare_output(make(tmp_path, "train.loss.beta=0.5"))
    assert (run / "teacher").exists() and (run / "pairs").exists()
    touch_outputs(run)  # now something was trained with beta 0.5: another beta is refused
    with pytest.raises(ConfigError, match=r"train.loss.beta: 0.5 -> 0.25"):
        prepare_output(make(tmp_path, "train.loss.beta=0.25"))


def test_changed_teacher_makes_everything_stale(tmp_path):
    prepare_output(make(tmp_path))
    touch_outputs(tmp_path / "run")
    with pytest.raises(ConfigError, match="its teacher outputs were made with a different config"):
        prepare_output(make(tmp_path, "teacher.sampling.temperature=0.5"))
    prepare_output(make(tmp_path, "teacher.sampling.temperature=0.5"), overwrite=True, log=lambda _: None)
    assert not any((tmp_path / "run" / name).exists() for name in ("teacher", "pairs", "train", "student"))


def test_inputs_in_a_job_copy_of_the_working_dir_compare_from_its_root(tmp_path):
    """`ray job submit --working-dir` reads inputs from Ray's copy of the working dir, under the cluster's session
    folder; the same command on a restarted cluster (a new session) gives the same inputs another path. Before,
    the run refused to resume: "its teacher outputs were made with a different config (data.prompts: ...)"."""
    package = "runtime_resources/working_dir_files/_ray_pkg_d16a0c3e9f4b1a27"
    old = f"/tmp/ray/session_2026-12-05_10-00-00_1/{package}/configs/prompts/tiny-reverse.jsonl"
    new = f"/tmp/plr-x/session_2026-12-06_11-00-00_2/{package}/configs/prompts/tiny-reverse.jsonl"
    prepare_output(make(tmp_path, f"data.prompts={old}"))
    touch_outputs(tmp_path / "run")
    import json

    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["teacher"]["data.prompts"]
    assert recorded == "<job working_dir>/configs/prompts/tiny-reverse.jsonl"
    prepare_output(make(tmp_path, f"data.prompts={new}"))  # resumes
    # A run.json written before paths were recorded this way resumes too.
    run_json = tmp_path / "run" / "run.json"
    keys = json.loads(run_json.read_text())
    keys["teacher"]["data.prompts"] = keys["pairs"]["data.prompts"] = keys["train"]["data.prompts"] = old
    run_json.write_text(json.dumps(keys))
    prepare_output(make(tmp_path, f"data.prompts={new}"))
    # Another file in the copy is another input.
    other = new.replace("tiny-reverse.jsonl", "capitals-fewshot.jsonl")
    with pytest.raises(
        ConfigError,
        match=r"data.prompts: '<job working_dir>/configs/prompts/tiny-reverse.jsonl' -> "
        r"'<job working_dir>/configs/prompts/capitals-fewshot.jsonl'",
    ):
        prepare_output(make(tmp_path, f"data.prompts={other}"))
