"""Which config made each part of an output folder, and what a re-run may reuse.

Each stage's outputs (their places: plad_ray.data.layout) depend on these config keys,
cumulatively: the teacher cache and quarantine on the data source and the teacher; the pairs
also on the student and the held-out split; training, the student, the evaluation and the
reports also on train; the teacher's scores of the pairs (teacher.score_samples) on the pairs and the
scoring keys, and nothing after them depends on those keys yet. run.json records them.

A re-run with the same keys resumes. When a stage's keys changed, that stage's outputs
and everything after it are stale: the run refuses (naming the first changed key)
unless --overwrite is given, which removes only the stale parts; a new training
config on the same pairs keeps the teacher outputs and the pairs.
"""

import functools
import os
import re

import pyarrow.fs as pafs

from plad_ray import staleness
from plad_ray.config import Config, DataConfig, StudentEngineConfig, TeacherEngineConfig, TrainConfig
from plad_ray.data import layout, storage
from plad_ray.errors import ConfigError, DataError

# "scores" last: turning teacher scoring on or changing its k makes only the scores stale.
STAGES = ("teacher", "pairs", "train", "scores")
OUTPUTS = {
    "teacher": (layout.TEACHER, layout.QUARANTINE),
    "pairs": (layout.PAIRS,),
    "train": (
        layout.TRAIN,
        layout.STUDENT,
        layout.TRAIN_REPORT,
        layout.EVAL,
        layout.REPORT,
        layout.SUMMARY,
        layout.LOSS_CURVE,
    ),
    "scores": (layout.SCORES,),
}
# Which key counts for which stage is declared on each config field (plad_ray.staleness); "tensorboard" is a train key
# older run.json files hold (what train.trackers replaced), operational too.
_TRAIN_OPERATIONAL = staleness.operational(TrainConfig) | {"tensorboard"}


# Under `ray job submit --working-dir` inputs are read from Ray's copy of the working dir, whose path names the
# cluster's session folder: <temp dir>/session_<time>/runtime_resources/working_dir_files/_ray_pkg_<hash>/. The same
# command on a restarted cluster (a new session) reads the same inputs under another path, so a path in that copy
# is recorded and compared from the copy's root on. (Its content is checked apart: the teacher cache's prompts
# against the source, plad_ray.checks.check_teacher_cache.)
_JOB_COPY = re.compile(r"^.*/runtime_resources/working_dir_files/_ray_pkg_[0-9a-f]+/")
JOB_COPY_ROOT = "<job working_dir>/"


def portable(value):
    """`value` with every path inside a job's working_dir copy written from the copy's root (`JOB_COPY_ROOT`)."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    return _JOB_COPY.sub(JOB_COPY_ROOT, value) if isinstance(value, str) else value


def stage_keys(cfg: Config) -> dict:
    """For each stage, the config values its outputs depend on (cumulative)."""
    d = portable(cfg.to_safe_dict())

    def section(name: str, cls: type, stage: str, default: str) -> dict:
        return {k: d[name][k] for k in staleness.keys(cls, stage, default)}

    def data(stage: str) -> dict:
        return {f"data.{k}": v for k, v in section("data", DataConfig, stage, "teacher").items()}

    teacher = {**data("teacher"), "teacher": section("teacher", TeacherEngineConfig, "teacher", "teacher")}
    pairs = {**teacher, "student": section("student", StudentEngineConfig, "pairs", "pairs"), **data("pairs")}
    train = section("train", TrainConfig, "train", "train")
    scores = {**pairs, "teacher_scoring": section("teacher", TeacherEngineConfig, "scores", "teacher")}
    return {"teacher": teacher, "pairs": pairs, "train": {**pairs, "train": train}, "scores": scores}


def _semantic_train(train: dict) -> dict:
    return {k: v for k, v in train.items() if k not in _TRAIN_OPERATIONAL}


def _comparable(stage: str, keys: dict, mine: dict) -> dict:
    """A stage's recorded keys without the operational ones (run.json files written before they were left out
    still hold them), and with the keys plad-ray gained since the record was written at their defaults, where
    this config leaves them there: a new option left alone does not make a finished run stale."""
    keys = _with_new_defaults(keys, mine[stage], _default_keys()[stage])
    if stage != "train" or not isinstance(keys.get("train"), dict):
        return keys
    return {**keys, "train": _semantic_train(keys["train"])}


@functools.cache
def _default_keys() -> dict:
    """stage_keys of a default Config (read-only: the defaults a key plad-ray gained since a record had)."""
    return stage_keys(Config())


def _with_new_defaults(recorded, current, default):
    if not (isinstance(recorded, dict) and isinstance(current, dict) and isinstance(default, dict)):
        return recorded
    out = dict(recorded)
    for key, value in current.items():
        if key in recorded:
            out[key] = _with_new_defaults(recorded[key], value, default.get(key))
        elif key in default and default[key] == value:
            out[key] = value
    return out


def prepare_output(cfg: Config, overwrite: bool = False, dry_run: bool = False, log=print) -> None:
    """Claim output_dir for this config: new, the same run resumed, or stale parts replaced.

    With dry_run, only check (nothing is written or removed).
    """
    run_uri = cfg.layout().run_file()
    _check_location(cfg.output_dir, run_uri)
    previous = portable(storage.read_json(run_uri) or {})  # run.json files from before paths were portable too
    mine = stage_keys(cfg)
    if not cfg.teacher.score_samples:  # scoring off: its outputs are neither read nor written, and keep their record
        mine.pop("scores")
        if "scores" in previous:
            mine["scores"] = previous["scores"]
    for index, stage in enumerate(STAGES):
        if stage not in previous or _comparable(stage, previous[stage], mine) == mine[stage]:
            continue
        stale = _outputs_from(cfg.output_dir, STAGES[index:])
        if not any(storage.exists(uri) for uri in stale):
            break  # nothing made with the old keys (e.g. a generation-only run recorded train keys): just record
        key = _first_difference(_comparable(stage, previous[stage], mine), mine[stage])
        if not overwrite or dry_run:
            if overwrite:
                log(f"[plad-ray] --overwrite would replace the {'/'.join(STAGES[index:])} outputs ({key})")
                break
            raise ConfigError(
                f"output_dir {cfg.output_dir}: its {stage} outputs were made with a different config "
                f"({key}); use a new output_dir, or pass --overwrite to replace them"
            )
        for uri in stale:
            storage.remove(uri)
        log(f"[plad-ray] --overwrite: removed the {'/'.join(STAGES[index:])} outputs made with {key}")
        break
    if not dry_run:
        storage.write_json(run_uri, mine)


def _outputs_from(output_dir: str, stages: tuple[str, ...]) -> list[str]:
    """Every output (and its unfinished .partial) of these stages."""
    rounds = _round_dirs(output_dir)
    names = [
        name
        for stage in stages
        for name in OUTPUTS[stage]
        + (rounds if stage == "pairs" else ())
        + (tuple(f"{r}/{layout.SCORES}" for r in rounds) if stage == "scores" else ())
    ]
    return [storage.join(output_dir, n + suffix) for n in names for suffix in ("", ".partial")]


def _round_dirs(output_dir: str) -> tuple[str, ...]:
    """round-<r>/ folders of later rounds (their pairs come from a trained student: stale with pairs)."""
    fs, path = storage.filesystem_and_path(output_dir)
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return tuple(e.base_name for e in entries if e.base_name.startswith(layout.ROUND_PREFIX))


def _check_location(output_dir: str, run_uri: str) -> None:
    """output_dir must be a new folder, an empty one, or an earlier run's; and writable."""
    fs, path = storage.filesystem_and_path(output_dir)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise DataError(f"output_dir {output_dir}: is a file; give a folder")
    if info.type == pafs.FileType.Directory and storage.read_json(run_uri) is None:
        if fs.get_file_info(pafs.FileSelector(path, recursive=False)):
            raise DataError(
                f"output_dir {output_dir}: exists and holds something other than a plad-ray run; "
                "give a new or empty folder"
            )
    if isinstance(fs, pafs.LocalFileSystem):  # remote stores say no at the first write
        existing = path
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
            raise DataError(
                f"output_dir {output_dir}: cannot be created under {existing} (not a writable folder); "
                "give a folder this user can write"
            )


def _first_difference(old, new, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {old!r} -> {new!r}"
