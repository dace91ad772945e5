"""Compare objectives on one set of pairs: dev-chosen learning rates, seeds, an A/A control and a verdict.

    plad-ray compare --config configs/tiny-cpu.yaml --objectives seqkd,hinge[beta=0.5;nll_weight=1] \
        [--seeds 3] [--grid 3e-4,1e-3,3e-3] [--out runs/compare]
    ray job submit --working-dir . -- python -m jobs.compare --config configs/<name>.yaml --objectives ...

The first objective is the default the others must beat. Pairs are made once (the config's teacher and
student engines); each objective trains on them over the learning-rate grid at seed 0 (the grid widens
until the best dev rate is inside it), then at its chosen rate over the other seeds; the default trains
again with another data order (the A/A control: the noise floor). Verdicts come from a hierarchical
bootstrap (seeds, then prompts) of the test prompts' greedy accuracy. Writes compare.json (the rule and
every per-prompt record), compare.md and compare.png under --out; re-running the same command resumes.
"""

from jobs import cli
from plad_ray.compare import plan
from plad_ray.compare.run import compare
from plad_ray.config import load_config
from plad_ray.data import storage
from plad_ray.errors import ConfigError


def add_arguments(p) -> None:
    p.add_argument(
        "--objectives",
        required=True,
        help="comma-separated loss types, the default first; train.loss keys in brackets, e.g. "
        "seqkd,hinge[beta=0.5;nll_weight=1]; values a|b are alternatives tuned on dev, e.g. hinge[beta=0.1|0.5|1]",
    )
    p.add_argument("--seeds", type=int, default=3, help="data-order seeds per objective (default 3)")
    p.add_argument("--grid", help="learning rates tried at seed 0 (default: train.learning_rate / 3, x1, x3)")
    p.add_argument(
        "--widen",
        type=int,
        default=plan.MAX_WIDENINGS,
        help=f"at most this many grid widenings per objective while its best dev rate is at an edge "
        f"(default {plan.MAX_WIDENINGS})",
    )
    p.add_argument("--out", help="where everything goes (default: <output_dir>-compare)")


def run(args) -> None:
    objectives = plan.parse_objectives(args.objectives)
    if args.seeds < 1 or args.widen < 0:
        raise ConfigError(f"--seeds {args.seeds} / --widen {args.widen}: seeds must be >= 1, widenings >= 0")
    cfg = cli.load(args)
    out = (
        storage.output_root(args.out, cfg.cluster.storage, storage.job_working_dir())
        if args.out
        else (cfg.output_dir.rstrip("/") + "-compare")
    )
    grid = plan.parse_grid(args.grid, cfg.train.learning_rate)
    tuned = sum(len(o.candidates) for o in objectives)
    print(
        f"[compare] {len(objectives)} objectives"
        + (f" ({tuned} candidate settings tuned on dev)" if tuned else "")
        + f", grid {', '.join(f'{r:g}' for r in grid)}, "
        f"{args.seeds} seed(s) -> {out}",
        flush=True,
    )
    if args.check:
        for c in (c for o in objectives for c in o.choices):
            load_config(args.config, [*args.overrides, *c.overrides])
        print("[compare] --check: the config and every objective's settings are fine; nothing was started")
        return
    compare(
        lambda more: load_config(args.config, [*args.overrides, *more]), objectives, grid, args.seeds, out, args.widen
    )
    print(f"outputs: {out}", flush=True)


if __name__ == "__main__":
    cli.main(run, __doc__, add_arguments=add_arguments)
