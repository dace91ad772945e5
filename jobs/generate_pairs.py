"""Generate teacher outputs (cached by prompt id) and student samples, and write the pairs.

    python -m jobs.generate_pairs --config configs/tiny-cpu.yaml [--set key=value ...]
    ray job submit --working-dir . -- python -m jobs.generate_pairs --config configs/<name>.yaml

Writes output_dir/teacher/ and output_dir/pairs/ (Parquet: prompt, chosen, rejected, ...).
"""

from jobs import cli
from plad_ray import pipeline


def run(args) -> None:
    cfg = cli.load(args)
    figures = pipeline.generate(cfg, overwrite=args.overwrite, check_only=args.check)
    if figures is not None:
        print(f"\npairs: {figures['pairs']} at {cfg.layout().pairs()}", flush=True)
        cli.done(cfg)


if __name__ == "__main__":
    cli.main(run, __doc__)
