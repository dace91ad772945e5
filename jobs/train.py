"""Train the student on existing pairs with the PLaD ranking loss, evaluate, export.

    python -m jobs.train --config configs/tiny-cpu.yaml [--set key=value ...]
    ray job submit --working-dir . -- python -m jobs.train --config configs/<name>.yaml

Reads output_dir/pairs/ (from jobs.generate_pairs); writes output_dir/student/ and
output_dir/report.json (round 1; jobs.distill runs train.rounds > 1 and the generation
evaluation, jobs.evaluate the latter alone). Re-running resumes from the last checkpoint.
"""

from jobs import cli
from plad_ray import pipeline


def run(args) -> None:
    cfg = cli.load(args)
    report = pipeline.train(cfg, overwrite=args.overwrite, check_only=args.check, command=args.command)
    if report is not None:
        cli.trained(cfg, report, args.command)


if __name__ == "__main__":
    cli.main(run, __doc__)
