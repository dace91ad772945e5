"""What every entry point shares: arguments, config loading, and one-line errors.

Errors a user can fix print one line (`plad-ray: error: ...`) and exit with the
error's code (config 2, data 3, runtime 4); Ctrl-C exits 130. `--debug` shows the
traceback instead.
"""

import argparse
import os
import sys
import traceback
from pathlib import Path

from plad_ray import console
from plad_ray.config import Config, load_config
from plad_ray.errors import PladError, RuntimeFailure


def parser(
    description: str, prog: str | None = None, sections: str | None = None, add_arguments=None
) -> argparse.ArgumentParser:
    epilog = f"config sections read: {sections} (see configs/ and README, Configuration)" if sections else None
    p = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="the run's YAML config (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.loss.beta=0.5 (repeatable)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace output_dir if it holds a run of a different config"
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="check config, inputs, models, resources and output_dir, then exit without starting anything",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show engine, Ray and DeepSpeed logs live (they always go to output_dir/logs/run.log)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    if add_arguments is not None:  # a job's own options (jobs.compare)
        add_arguments(p)
    return p


def load(args: argparse.Namespace) -> Config:
    """The config, and its outputs' absolute location said once (again by `done` at the end)."""
    cfg = load_config(args.config, args.overrides)
    print(f"[plad-ray] outputs: {cfg.output_dir}", flush=True)
    return cfg


def done(cfg: Config) -> None:
    print(f"outputs: {cfg.output_dir}", flush=True)


def trained(cfg: Config, report: dict, command: list[str]) -> None:
    """The end of a job that trained: the student's model card, the run's summary, the outputs' location."""
    from plad_ray.model_card import write_card
    from plad_ray.summary import summary_lines

    card = write_card(cfg, report, command)
    if card:
        print(f"[plad-ray] model card -> {card}", flush=True)
    print("\n" + summary_lines(report), flush=True)
    done(cfg)


def main(
    run,
    description: str,
    argv: list[str] | None = None,
    prog: str | None = None,
    sections: str | None = None,
    add_arguments=None,
) -> None:
    """Parse, run `run(args)`, and turn failures into one line and an exit code."""
    args = parser(description, prog, sections, add_arguments).parse_args(argv)
    # The command as the user gave it (the model card records it).
    args.command = [
        *(prog.split() if prog else ["python", "-m", f"jobs.{Path(sys.argv[0]).stem}"]),
        *(sys.argv[1:] if argv is None else argv),
    ]
    console.quiet(verbose=args.verbose)
    started_in = os.getcwd()
    try:
        run(args)
        _stop_ray()
        console.close()
    except PladError as e:
        _fail(args, e, f"plad-ray: error: {e}", e.exit_code)
    except KeyboardInterrupt as e:
        _fail(args, e, "plad-ray: interrupted; re-run the same command to resume", 130)
    except Exception as e:  # a failed stage: Ray, vLLM or DeepSpeed said why above
        _fail(args, e, runtime_failure_line(e, started_in), RuntimeFailure.exit_code)


def runtime_failure_line(error: Exception, started_in: str) -> str:
    """The one line of a failure plad-ray has no words of its own for: the stage it happened in (errors.stage),
    the error's first line, and for a missing file without a name the folder that disappeared: the working
    directory the job started in (under `ray job submit`, Ray's copy of the working dir, which Ray unpacks again
    when another node shares this node's temp dir)."""
    where = f" in {error.plad_stage}" if getattr(error, "plad_stage", None) else ""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    line = f"plad-ray: runtime failure{where}: {type(error).__name__}: {first}"
    if isinstance(error, FileNotFoundError) and not error.filename and not os.path.isdir(started_in):
        line += (
            f" (the job's working directory {started_in} was removed while it ran; under ray job submit give "
            "every node its own `ray start --temp-dir`)"
        )
    return line + " (re-run with --debug for the traceback)"


def _fail(args, error: BaseException, line: str, code: int) -> None:
    if args.debug:
        traceback.print_exception(error)
    _stop_ray()  # its shutdown logs would otherwise bury the line below
    console.close()
    if console.log_path():
        print(f"plad-ray: engine, Ray and DeepSpeed logs: {console.log_path()}", file=sys.stderr, flush=True)
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def _stop_ray() -> None:
    """Ray's shutdown, and a local cluster's leftover processes killed (plad_ray.cluster.shutdown)."""
    if "ray" in sys.modules:
        from plad_ray import cluster

        try:
            cluster.shutdown()
        except BaseException:  # a second Ctrl-C during shutdown: the line still matters more
            pass
