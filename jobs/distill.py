"""Distill a teacher into a student with PLaD: generate pairs, train, evaluate, export.

    python -m jobs.distill --config configs/tiny-cpu.yaml [--set key=value ...]
    ray job submit --working-dir . -- python -m jobs.distill --config configs/<name>.yaml

Starts a local Ray cluster unless cluster.address or $RAY_ADDRESS names one. Writes
teacher/, pairs/, student/ (round-<r>/ for train.rounds > 1), eval/ and report.json under
output_dir; re-running resumes.
"""

from jobs import cli
from plad_ray import pipeline


def run(args) -> None:
    cfg = cli.load(args)
    report = pipeline.distill(cfg, overwrite=args.overwrite, check_only=args.check, command=args.command)
    if report is not None:
        cli.trained(cfg, report, args.command)


if __name__ == "__main__":
    cli.main(run, __doc__)
