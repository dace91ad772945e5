"""Generate teacher outputs (cached by prompt id) and student samples, and write the pairs.

    python -m jobs.generate_pairs --config configs/tiny-cpu.yaml [--set key=value ...]
    ray job submit --working-dir . -- python -m jobs.generate_pairs --config configs/<name>.yaml

Writes output_dir/teacher/ and output_dir/pairs/ (Parquet: prompt, chosen, rejected, ...).
"""

from plad_ray import cli, pipeline
from plad_ray.cluster import connect
from plad_ray.outputs import prepare_output


def run(args) -> None:
    cfg = cli.load(args)
    inputs = pipeline.check_inputs(cfg)
    prepare_output(cfg, overwrite=args.overwrite)
    print(f"[plad-ray] {connect(cfg.cluster)}", flush=True)
    figures = pipeline.generate_teacher(cfg, inputs)
    figures.update(pipeline.generate_pairs(cfg, inputs))
    print(f"\npairs: {figures['pairs']} at {cfg.pairs_uri()}", flush=True)


if __name__ == "__main__":
    cli.main(run, __doc__)
