"""The `plad-ray` command: one entry point for every job.

    plad-ray distill --config configs/tiny-cpu.yaml [--set key=value ...] [--check]
    plad-ray generate-pairs | train | evaluate --config ...

Each job is the module `python -m jobs.<name>` runs (what `ray job submit` users call);
this only dispatches to it.
"""

import ast
import importlib.util
import sys

from jobs import cli

# job -> (module, the config sections it reads)
JOBS = {
    "distill": ("jobs.distill", "data, teacher, student, train, eval, cluster"),
    "generate-pairs": ("jobs.generate_pairs", "data, teacher, student, cluster, and train.max_length (prompt lengths)"),
    "train": ("jobs.train", "student (its model), train, cluster, and eval for the held-out scoring"),
    "evaluate": ("jobs.evaluate", "data, teacher, student, eval, cluster"),
    "compare": ("jobs.compare", "data, teacher, student, train, eval, cluster"),
}


def usage() -> str:
    width = max(map(len, JOBS))
    lines = [
        "usage: plad-ray JOB --config FILE [--set KEY=VALUE ...] [--check] [--overwrite] [--verbose] [--debug]",
        "",
        "PLaD distillation on Ray: vLLM pair generation, DeepSpeed ranking-loss training.",
        "",
        "jobs:",
    ]
    for name, (module, _) in JOBS.items():
        lines.append(f"  {name:<{width}}  {_summary(module)}")
    lines += [
        "",
        "`plad-ray JOB --help` shows a job's options and the config sections it reads.",
        "Under `ray job submit`, call the module instead: python -m jobs.<job with _ for ->.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in JOBS:
        print(
            f"plad-ray: error: unknown job {name!r}; choose one of: {', '.join(JOBS)} (plad-ray --help)",
            file=sys.stderr,
        )
        sys.exit(2)
    module_name, sections = JOBS[name]
    module = importlib.import_module(module_name)
    extra = getattr(module, "add_arguments", None)  # a job's own options (jobs.compare)
    cli.main(module.run, module.__doc__, rest, prog=f"plad-ray {name}", sections=sections, add_arguments=extra)


def _summary(module_name: str) -> str:
    """A job's first docstring line, without importing it (its imports are heavy)."""
    spec = importlib.util.find_spec(module_name)
    with open(spec.origin) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    return doc.splitlines()[0] if doc else ""
