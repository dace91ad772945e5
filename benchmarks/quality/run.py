"""Quality benchmark: does PLaD beat SeqKD, token-level KD and SFT under the same budget?

    python -m benchmarks.quality.run [--seeds 0 1 2] [--out runs/quality]     (make bench-quality)
    python -m benchmarks.quality.run --seeds 0 --out runs/quality-lr1e-4 --set train.learning_rate=1e-4
                                     (a variant: --set applies to every method; use its own --out)

Per seed: build the initial student (the tiny student's shape, SFT-ed on labelled reversal
examples with that seed), then run the engine's jobs as a user would (subprocesses):

  PLaD hinge + PLaD iterative   jobs.distill, train.rounds=2 (round 1 = hinge, round 2 = iterative)
  PLaD + NLL, SeqKD, token KD   jobs.distill on the same teacher outputs and pairs (copied in), one train.* override
  SFT only                      jobs.distill with train.pairs = labelled (prompt, reference) rows + the same held-out pairs

Every method trains the same number of optimizer steps (as many as the PLaD pairs give, at
most train.max_steps) with the same optimizer, learning rate and batch size, and is evaluated by jobs.distill's evaluate stage
(greedy vLLM generation on the same held-out prompts, `reverse` verifier). The table
(mean ± sample sd over seeds) goes to benchmarks/results/quality-<time>.json and .md.
"""

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from plad_ray import tiny

ROOT = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).with_name("config.yaml")
NUM_PROMPTS = 1536
STUDENT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, steps=1000)
METHODS = {  # name -> train overrides (beyond the shared config)
    "PLaD + NLL": ["train.loss.nll_weight=1.0"],
    "SeqKD": ["train.loss.type=seqkd"],
    "token KD": ["train.loss.type=token_kd"],
    "SFT only": ["train.loss.type=seqkd"],  # + train.pairs: labelled references instead of teacher outputs
}
ROWS = ("teacher", "initial student", "PLaD hinge", "PLaD + NLL", "PLaD iterative (2 rounds)", "SeqKD", "token KD",
        "SFT only")
COLUMNS = (("accuracy", "verifier accuracy"), ("win_rate", "win rate vs teacher"),
           ("pair_ranking_accuracy", "held-out pair-ranking acc."), ("ece", "ECE"))


def write_prompts(path: Path, n: int, seed: int) -> list[dict]:
    """n reversal prompts with references; the same set for every seed (one teacher cache)."""
    rng = random.Random(seed)
    rows = [dict(zip(("prompt", "reference"), tiny.reversal_example(rng)), id=f"q{i:05d}") for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def run_job(job: str, out: Path, overrides: list[str], log: Path) -> None:
    cmd = [sys.executable, "-m", f"jobs.{job}", "--config", str(CONFIG), "--set", f"output_dir={out}"]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    print(f"  {job} -> {out.name}: exit {code} in {time.perf_counter() - start:.0f}s (log {log})", flush=True)
    if code != 0:
        raise SystemExit(f"benchmark: {' '.join(cmd)} failed (exit {code}); see {log}")


def seed_method_dir(base: Path, target: Path) -> None:
    """A new run folder holding the base run's teacher outputs and pairs (and their config keys)."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in ("teacher", "pairs"):
        shutil.copytree(base / name, target / name)
    keys = json.loads((base / "run.json").read_text())
    (target / "run.json").write_text(json.dumps({k: keys[k] for k in ("teacher", "pairs")}))


def write_labelled_pairs(base: Path, path: Path, n: int, seed: int) -> None:
    """SFT data: n fresh labelled examples as pairs (chosen = reference), plus the base run's held-out
    pairs so the held-out pair-ranking figure is measured on the same pairs as every method."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(10_000 + seed)
    rows = []
    for i in range(n):
        prompt, answer = tiny.reversal_example(rng)
        # The rejected side is unused by the SFT loss (seqkd trains the chosen side only).
        rows.append({"id": f"sft{i:05d}", "prompt": prompt, "chosen": answer, "rejected": prompt[:-1],
                     "heldout": False})
    held = pq.read_table(base / "pairs", columns=["id", "prompt", "chosen", "rejected", "heldout", "chosen_finish_reason",
                                                   "rejected_finish_reason"]).to_pylist()
    held = [r for r in held if r["heldout"]]
    for r in rows:
        r.update(chosen_finish_reason="stop", rejected_finish_reason="stop")
    pq.write_table(pa.Table.from_pylist(rows + held), path)


def figures(run: Path, model: str) -> dict:
    evaluation = json.loads((run / "eval" / "report.json").read_text())["models"][model]
    return {"accuracy": evaluation.get("verifier_accuracy"), "win_rate": evaluation.get("vs_teacher", {}).get("win_rate"),
            "ece": evaluation.get("ece"), "mean_confidence": evaluation.get("mean_confidence")}


def train_figures(run: Path, round: int = 1) -> dict:
    report = json.loads((run / "report.json").read_text())
    r = report["rounds"][round - 1]
    return {"pair_ranking_accuracy": r["eval_trained"]["ranking_accuracy"], "steps": r["steps"],
            "initial_pair_ranking_accuracy": r["eval_initial"]["ranking_accuracy"]}


def run_seed(seed: int, out: Path, prompts: Path, steps: int, overrides: list[str] = ()) -> dict:
    work = out / f"seed-{seed}"
    work.mkdir(parents=True, exist_ok=True)
    student = work / "initial-student"
    if not student.is_dir():
        start = time.perf_counter()
        partial = work / "initial-student.partial"
        shutil.rmtree(partial, ignore_errors=True)
        accuracy = tiny.build(STUDENT, partial, seed=seed)
        partial.rename(student)
        print(f"  initial student (seed {seed}): SFT accuracy {accuracy:.2f} on 64 fresh words, "
              f"{time.perf_counter() - start:.0f}s", flush=True)
    shared = [f"data.prompts={prompts}", f"student.model={student}", f"student.sampling.seed={seed}",
              f"train.seed={seed}", f"train.max_steps={steps}", *overrides]
    base = work / "plad-hinge"
    run_job("distill", base, shared + ["train.rounds=2"], work / "plad-hinge.log")
    results = {"teacher": figures(base, "teacher (cached outputs)"),
               "initial student": {**figures(base, "initial student"),
                                   "pair_ranking_accuracy": train_figures(base)["initial_pair_ranking_accuracy"]},
               "PLaD hinge": {**figures(base, "round 1 student"), **train_figures(base, 1)},
               "PLaD iterative (2 rounds)": {**figures(base, "round 2 student"), **train_figures(base, 2)}}
    for name, overrides in METHODS.items():
        target = work / name.lower().replace(" + ", "-").replace(" ", "-")
        if (target / "eval" / "report.json").is_file() and (target / "report.json").is_file():
            results[name] = {**figures(target, "trained student"), **train_figures(target)}  # an earlier run's
            continue
        seed_method_dir(base, target)
        extra = []
        if name == "SFT only":
            labelled = work / "labelled-pairs.parquet"
            # As many labelled examples as the distillation methods have training pairs (pairs where the
            # student already wrote the teacher's text carry no ranking signal and are dropped for every
            # method), so SFT gets the same steps.
            train_pairs = json.loads((base / "train_report.json").read_text())["counts"]["train"]
            write_labelled_pairs(base, labelled, train_pairs, seed)
            extra = [f"train.pairs={labelled}"]
        run_job("distill", target, shared + overrides + extra + ["eval.initial_student=false"],
                work / f"{target.name}.log")
        results[name] = {**figures(target, "trained student"), **train_figures(target)}
    return results


def table(per_seed: list[dict]) -> str:
    lines = ["| | " + " | ".join(title for _, title in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for row in ROWS:
        cells = []
        for key, _ in COLUMNS:
            values = [s[row][key] for s in per_seed if s[row].get(key) is not None]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3f}")
            else:
                cells.append(f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--steps", type=int, default=160, help="optimizer steps of every method (train.max_steps)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every method's run (repeatable), e.g. train.learning_rate=1e-4")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    write_prompts(prompts, NUM_PROMPTS, seed=4321)
    start = time.perf_counter()
    per_seed = []
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        per_seed.append(run_seed(seed, out, prompts, args.steps, args.overrides))
    minutes = (time.perf_counter() - start) / 60
    text = table(per_seed)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / f"quality-{stamp}.json").write_text(json.dumps(
        {"seeds": args.seeds, "steps": args.steps, "overrides": args.overrides, "prompts": NUM_PROMPTS, "student_recipe": STUDENT,
         "minutes": minutes, "machine": machine, "per_seed": per_seed}, indent=1))
    (results / f"quality-{stamp}.md").write_text(
        f"{text}\n\nseeds {args.seeds}, {args.steps} steps per method, overrides {args.overrides or 'none'}, "
        f"{minutes:.1f} min on {machine}\n")
    print("\n" + text + f"\n\n{minutes:.1f} min; results/quality-{stamp}.json", flush=True)


if __name__ == "__main__":
    main()
