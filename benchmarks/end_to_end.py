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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny-cpu.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "run"
        sets = [x for o in [f"output_dir={out}", *args.overrides] for x in ("--set", o)]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "jobs.distill", "--config", args.config, *sets], cwd=ROOT,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"jobs.distill failed:\n{proc.stderr[-3000:]}")
        report = json.loads((out / "report.json").read_text())
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
    print(table([{"trainer start-up phase": k.removesuffix("_s"), "seconds": v} for k, v in startup.items()],
                ["trainer start-up phase", "seconds"]))
    print(f"padding share of training tokens: {padding:.3f}   teacher tokens: {g.get('teacher_tokens')}   "
          f"student tokens: {g.get('student_tokens')}")
    print(f"results -> {save('end_to_end', {'config': args.config, 'overrides': args.overrides, 'stages': stages, 'startup': startup, 'wall_s': wall, 'padding': padding})}")


if __name__ == "__main__":
    main()
