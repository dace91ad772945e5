"""Model folders: resolve a config's model spec to a checked local HF folder.

A spec is a local HF folder (on shared storage for multi-node runs; download hub models
once with `huggingface-cli download <id> --local-dir <folder>`), a folder on object storage
(`s3://...`: fetched to `cluster.model_cache` once per node, plad_ray.models.cache) or
`tiny:<role>` for the project's own tiny models. Checked before any engine starts: config.json, a tokenizer,
and safetensors weights (pickle checkpoints can run code when loaded; they are refused).
"""

import json
from pathlib import Path

from plad_ray.models import tiny
from plad_ray.models.cache import is_remote, local_model
from plad_ray.errors import DataError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def resolve_model(spec: str, key: str, allow_pickle: bool = False, chat_template: bool = False, log=print,
                  cache_root: str = "~/.cache/plad-ray/models") -> str:
    """The local folder for `spec`, checked; `key` names the config key in error messages. A URI is fetched to
    `cache_root` on this node first (`pipeline.prepare` fetches it to the other nodes once Ray is up)."""
    if is_remote(spec):
        log(f"[plad-ray] {key}: {spec} -> {cache_root} (fetched once per node)")
        folder = Path(local_model(spec, cache_root))
    else:
        folder = Path(tiny.materialize(spec, log=log) if tiny.is_tiny(spec) else spec).expanduser()
    if not folder.is_dir():
        raise DataError(f"config key {key}: model folder {spec} not found; give the path of a HF model folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise DataError(f"config key {key}: {spec} has no config.json; it is not a HF model folder")
    try:
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    except json.JSONDecodeError:
        raise DataError(f"config key {key}: {spec}/config.json is not valid JSON") from None
    if not any(a.endswith("ForCausalLM") for a in architectures):
        raise DataError(f"config key {key}: {spec} is not a causal LM (architectures: {architectures or 'none'}); "
                        "PLaD needs a decoder that generates text, e.g. LlamaForCausalLM")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(f"config key {key}: {spec} has no tokenizer files; save the tokenizer into the model folder")
    if chat_template and not has_chat_template(folder):
        raise DataError(f"config key {key}: {spec}'s tokenizer has no chat template, but "
                        f"{key.rsplit('.', 1)[0]}.chat_template is on; turn it off or add a template")
    if not any(folder.glob("*.safetensors")):
        if not any(folder.glob("*.bin")) and not any(folder.glob("*.pt")):
            raise DataError(f"config key {key}: {spec} has no weights (*.safetensors)")
        if not allow_pickle:
            raise DataError(f"config key {key}: {spec} has only pickle (.bin/.pt) weights, which can run code when "
                            f"loaded; convert them to safetensors, or set {key.rsplit('.', 1)[0]}.allow_pickle_weights=true")
    return str(folder.resolve())


def has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def eos_token_ids(folder: str) -> list[int]:
    """The token ids that end generation, from generation_config.json or config.json."""
    for name in ("generation_config.json", "config.json"):
        path = Path(folder) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return list(eos) if isinstance(eos, list) else [eos]
    return []


def shares_vocabulary(first: str, second: str, trust_remote_code: bool = False) -> bool:
    """Whether two model folders' tokenizers map every id to the same token (then ids cross as they are)."""
    from transformers import AutoTokenizer

    vocab = [AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code).get_vocab() for p in (first, second)]
    return vocab[0] == vocab[1]


def embedding_rows(folder: str, trust_remote_code: bool = False) -> int:
    """The model's embedding rows, the width of its logits (its text config's vocab_size): often more than its
    tokenizer's tokens (a vocabulary padded to a multiple of 64 or 128)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code).get_text_config().vocab_size


def tokenizer_size(folder: str, trust_remote_code: bool = False) -> int:
    """How many token ids the folder's tokenizer can write, added tokens included (len(tokenizer))."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code))
