"""Generate teacher outputs (cached by prompt id) and student samples, and write the pairs.

    python -m jobs.generate_pairs --config configs/tiny-cpu.yaml [--set key=value ...]
    ray job submit --working-dir . -- python -m jobs.generate_pairs --config configs/<name>.yaml

Writes output_dir/teacher/ and output_dir/pairs/ (Parquet: prompt, chosen, rejected, ...).
"""

from plad_ray import cli, pipeline


def run(args) -> None:
    cfg = cli.load(args)
    inputs = pipeline.prepare(cfg, generation=True, training=False, overwrite=args.overwrite, check_only=args.check)
    if inputs is None:
        return
    figures = pipeline.generate_teacher(cfg, inputs)
    figures.update(pipeline.generate_pairs(cfg, inputs))
    print(f"\npairs: {figures['pairs']} at {cfg.pairs_uri()}", flush=True)


if __name__ == "__main__":
    cli.main(run, __doc__)
