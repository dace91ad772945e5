"""What a config key's change makes stale, declared on the key itself: `field(metadata=...)` in the config's
dataclasses (plad_ray.config, plad_ray.config_train); plad_ray.outputs records and compares the keys by it.

A key without a marker counts for the outputs of the stage its section feeds: data and teacher keys for the teacher
outputs, student keys for the pairs, train keys for training (each stage's outputs are stale with everything
before them: plad_ray.outputs.STAGES)."""

from dataclasses import fields

OPERATIONAL = {"stale": None}  # how a run is operated (speed, placement, retries, logging): a change resumes it
SCORES = {"stale": "scores"}  # the teacher's scoring of the pairs: a change makes only the scores stale
PAIRS = {"stale": "pairs"}  # a data key the pairs depend on and the teacher outputs do not


def keys(section: type, stage: str, default: str) -> list[str]:
    """The fields of the config dataclass `section` whose change makes `stage`'s outputs stale, where an unmarked
    field counts for `default`."""
    return [f.name for f in fields(section) if f.metadata.get("stale", default) == stage]


def operational(section: type) -> set[str]:
    """The fields of `section` whose change never makes an output stale."""
    return {f.name for f in fields(section) if "stale" in f.metadata and f.metadata["stale"] is None}
