"""End to end: wall time of `jobs.distill` split by stage, and the padding share in training.

    python -m benchmarks.end_to_end                                   # configs/tiny-cpu.yaml, ~4 min here
    python -m benchmarks.end_to_end --config configs/<name>.yaml [--set key=value ...]

Runs the job as users do (a fresh process, a fresh output folder) and reads its
report.json: teacher generation, student generation (with the pair write), training
data preparation (tokenization), trainer start-up, held-out scoring before and after, the
training loop, the export, and the task-quality evaluation (vLLM; the initial student's
generations overlap training, so this is what is left of it after training); what is left
is Ray and process start-up and the checks. A second table breaks the trainer start-up
down by phase (rank 0's clock; report.json `timings.startup`).

    python -m benchmarks.end_to_end --stream-vs-sequential [--set key=value ...]

runs the job twice on the same resources, with `train.stream` off and on (in that order, each in a fresh
process and folder, teacher outputs generated in both), and prints them side by side: wall time, the time
from the start of student generation to the exported student (what streaming overlaps), and the task
quality of the result.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import save, table

ROOT = Path(__file__).resolve().parent.parent


def distill(config: str, overrides: list[str]) -> tuple[dict, float]:
    """jobs.distill in a fresh process and output folder: its report.json and wall seconds."""
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "run"
        sets = [x for o in [f"output_dir={out}", *overrides] for x in ("--set", o)]
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.distill", "--config", config, *sets], cwd=ROOT, capture_output=True, text=True
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"jobs.distill failed:\n{proc.stderr[-3000:]}")
        return json.loads((out / "report.json").read_text()), wall


def stream_vs_sequential(config: str, overrides: list[str]) -> None:
    rows = []
    for stream in (False, True):
        report, wall = distill(config, [*overrides, f"train.stream={str(stream).lower()}"])
        g = report["generation"]
        if stream:  # the student engines and the trainer ran at once: from the stream's start to its commit
            student_to_trained = g["student_seconds"]
        else:
            student_to_trained = g["student_seconds"] + report["train_seconds"]
        evaluation = report.get("evaluation") or {}
        trained = (evaluation.get("models") or {}).get("trained student", {})
        rows.append(
            {
                "mode": "streaming" if stream else "sequential",
                "wall_s": wall,
                "teacher_s": g.get("teacher_seconds", 0.0),
                "student_gen_to_trained_s": student_to_trained,
                "steps": report["steps"],
                "pairs_trained": report["counts"].get("trained", report["counts"]["train"]),
                "heldout_exact_match": trained.get("exact_match"),
                "heldout_ranking_accuracy": report["eval_trained"]["ranking_accuracy"],
            }
        )
    print(table(rows, list(rows[0])))
    print(
        f"streaming / sequential: wall {rows[1]['wall_s'] / rows[0]['wall_s']:.3f}, student generation to trained "
        f"student {rows[1]['student_gen_to_trained_s'] / rows[0]['student_gen_to_trained_s']:.3f}"
    )
    print(f"results -> {save('stream_vs_sequential', {'config': config, 'overrides': overrides, 'rows': rows})}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny-cpu.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--stream-vs-sequential", action="store_true")
    args = parser.parse_args()
    if args.stream_vs_sequential:
        return stream_vs_sequential(args.config, args.overrides)
    report, wall = distill(args.config, args.overrides)
    g, t = report["generation"], report["timings"]
    stages = {
        "teacher generation": g.get("teacher_seconds", 0.0),
        "student generation + pair write": g.get("student_seconds", 0.0),
        "training data prep (tokenize)": t["prepare_s"],
        "trainer start-up (workers, model, DeepSpeed)": t["startup_s"],
        "held-out scoring (before + after)": t["eval_s"],
        "training loop": t["loop_s"],
        "export (HF checkpoint)": t["export_s"],
        "task-quality evaluation (after training)": (report.get("evaluation") or {}).get("eval_seconds", 0.0),
    }
    stages["rest (Ray start, checks, driver)"] = wall - sum(stages.values())
    rows = [{"stage": k, "seconds": v, "share": v / wall} for k, v in stages.items()]
    rows.append({"stage": "total (wall)", "seconds": wall, "share": 1.0})
    curve = report["curve"]
    padding = 1 - sum(c["tokens"] for c in curve) / sum(c["tokens"] / (1 - c["padding"]) for c in curve)
    print(table(rows, ["stage", "seconds", "share"]))
    startup = t.get("startup", {})
    print(
        table(
            [{"trainer start-up phase": k.removesuffix("_s"), "seconds": v} for k, v in startup.items()],
            ["trainer start-up phase", "seconds"],
        )
    )
    print(
        f"padding share of training tokens: {padding:.3f}   teacher tokens: {g.get('teacher_tokens')}   "
        f"student tokens: {g.get('student_tokens')}"
    )
    print(
        "results -> "
        + save(
            "end_to_end",
            {
                "config": args.config,
                "overrides": args.overrides,
                "stages": stages,
                "startup": startup,
                "wall_s": wall,
                "padding": padding,
            },
        )
    )


if __name__ == "__main__":
    main()
