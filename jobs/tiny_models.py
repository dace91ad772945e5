"""Build the project's tiny teacher and student ahead of time, or write a reversal prompt set.

    python -m jobs.tiny_models                       # build (or find cached) tiny:teacher, tiny:student
    python -m jobs.tiny_models --prompts configs/prompts/tiny-reverse.jsonl --num-prompts 256

Jobs build the tiny models on first use anyway (plad_ray/models/tiny.py, cached under
~/.cache/plad-ray); prints each model's folder.
"""

import argparse

from plad_ray.models import tiny


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", help="write a JSONL prompt set to this path")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    if args.prompts:
        tiny.write_prompts(args.prompts, args.num_prompts, args.seed)
        print(f"wrote {args.num_prompts} prompts to {args.prompts}")
    else:
        for role in tiny.RECIPES:
            print(tiny.materialize(tiny.PREFIX + role))


if __name__ == "__main__":
    main()
