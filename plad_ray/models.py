"""Model folders: resolve a config's model spec to a checked local HF folder.

A spec is a local HF folder (on shared storage for multi-node runs; download hub models
once with `huggingface-cli download <id> --local-dir <folder>`) or `tiny:<role>` for the
project's own tiny models. Checked before any engine starts: config.json, a tokenizer,
and safetensors weights (pickle checkpoints can run code when loaded; they are refused).
"""

import json
from pathlib import Path

from plad_ray import tiny
from plad_ray.errors import DataError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def resolve_model(spec: str, key: str, log=print) -> str:
    """The local folder for `spec`; `key` names the config key in error messages."""
    if tiny.is_tiny(spec):
        return tiny.materialize(spec, log=log)
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise DataError(f"config key {key}: model folder {spec} not found; give the path of a HF model folder")
    if not (folder / "config.json").is_file():
        raise DataError(f"config key {key}: {spec} has no config.json; it is not a HF model folder")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(f"config key {key}: {spec} has no tokenizer files; save the tokenizer into the model folder")
    if not any(folder.glob("*.safetensors")):
        found = "pickle (.bin/.pt) weights, which are refused" if any(folder.glob("*.bin")) else "no weights"
        raise DataError(f"config key {key}: {spec} has {found}; convert the model to safetensors")
    return str(folder.resolve())


def eos_token_ids(folder: str) -> list[int]:
    """The token ids that end generation, from generation_config.json or config.json."""
    for name in ("generation_config.json", "config.json"):
        path = Path(folder) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return list(eos) if isinstance(eos, list) else [eos]
    return []
