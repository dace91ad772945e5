"""Scaling: prompts -> teacher -> pairs -> training feed, at 10k, 100k and 1M synthetic prompts.

    python -m benchmarks.scale                          # 10k, 100k, 1M (1M takes hours on 2 cores)
    python -m benchmarks.scale --sizes 10000 100000

Each size runs in a fresh process, as `jobs.generate_pairs` and the training driver run it, with
the tiny models and generation cut to a couple of tokens (`--max-tokens`) so that it fits this
machine: what grows with the prompt count is the data path, which is what is measured.
Per size: the driver's peak RSS (the job process itself; Ray's workers are other processes),
seconds and rows/s of each stage, and the object store's peak (Plasma usage polled every
second). Stages:
  checks:  check config, models and prompt files, start Ray, then read, validate and
           length-check the prompt rows in Ray Data (pipeline.prepare);
  teacher: teacher outputs through the vLLM engine, written and committed (generate_teacher);
  pairs:   one student sample per prompt, pairs written and committed (generate_pairs);
  feed:    the training driver's preparation (tokenise, order, count, split per rank) of the
           pairs, without training (train.prepare.prepare_pairs + the per-rank splits).
Writes a table, JSON and a PNG of driver RSS and seconds per 1k prompts against prompt count.
"""

import argparse
import json
import random
import re
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import RESULTS, answer_one, in_fresh_process, save, table

TAG = "SCALE"
STAGES = ("checks", "teacher", "pairs", "feed")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _ObjectStorePeak(threading.Thread):
    """Polls the cluster's Plasma usage once a second; `peak_mb` is the largest seen."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_mb, self.running = 0, True

    def run(self) -> None:
        import ray
        from ray._private.internal_api import memory_summary

        while self.running:
            if ray.is_initialized():
                try:
                    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
                    used = re.search(r"Plasma memory usage (\d+) MiB", text)
                    self.peak_mb = max(self.peak_mb, int(used.group(1))) if used else self.peak_mb
                except Exception:  # noqa: BLE001 - the cluster is starting or stopping
                    pass
            time.sleep(1.0)


def write_prompts(path: Path, n: int, seed: int = 0) -> None:
    """n reversal prompts ("abc>", 3-8 letters) with ids, as JSONL."""
    rng = random.Random(seed)
    with open(path, "w") as out:
        for i in range(n):
            word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
            out.write(json.dumps({"id": f"s{i:07d}", "prompt": word + ">"}) + "\n")


class _Laps:
    """Seconds and the driver's RSS after each stage, each said on stderr as it ends; the object store's peak
    polled from the start to `stop`. A stage's clock starts where the previous one ended."""

    def __init__(self, label: str):
        self.label, self.seconds, self.rss = label, {}, {}
        self.store = _ObjectStorePeak()
        self.store.start()
        self.start = time.perf_counter()

    def lap(self, stage: str) -> None:
        self.seconds[stage] = time.perf_counter() - self.start
        self.rss[stage] = _rss_mb()
        print(
            f"[scale] {self.label}: {stage} {self.seconds[stage]:.1f} s, driver RSS {self.rss[stage]:.0f} MB",
            file=sys.stderr,
            flush=True,
        )
        self.start = time.perf_counter()

    def stop(self) -> int:
        """The object store's peak (MB)."""
        self.store.running = False
        return self.store.peak_mb


def _run(n: int, max_tokens: int, batch_size: int, *overrides: str):
    """A temporary folder with n synthetic prompts, and the tiny config's run on them (generation cut to
    `max_tokens`, one student sample per prompt, no evaluation), with `overrides`."""
    from plad_ray.config import load_config

    folder = Path(tempfile.mkdtemp(prefix=f"plad-ray-scale-{n}-"))
    write_prompts(folder / "prompts.jsonl", n)
    cfg = load_config(
        "configs/tiny-cpu.yaml",
        [
            f"data.prompts={folder / 'prompts.jsonl'}",
            f"output_dir={folder / 'run'}",
            "student.num_samples=1",
            f"teacher.sampling.max_tokens={max_tokens}",
            f"student.sampling.max_tokens={max_tokens}",
            f"teacher.batch_size={batch_size}",
            f"student.batch_size={batch_size}",
            "eval.enabled=false",
            *overrides,
        ],
    )
    return folder, cfg


def measure(n: int, max_tokens: int, batch_size: int) -> dict:
    from plad_ray.data import parquet
    from plad_ray.generate.student import generate_pairs
    from plad_ray.generate.teacher import generate_teacher
    from plad_ray.pipeline import prepare
    from plad_ray.train.prepare import PairText, prepare_pairs

    folder, cfg = _run(n, max_tokens, batch_size)
    quiet = lambda line: None  # noqa: E731
    rows = {"prompts": n}
    laps = _Laps(f"{n} prompts")
    inputs = prepare(cfg, generation=True, training=True, log=quiet)
    laps.lap("checks")
    run = cfg.context()
    rows["teacher"] = generate_teacher(cfg.teacher, run, inputs, quiet)["teacher_generated"]
    laps.lap("teacher")
    rows["pairs"] = generate_pairs(cfg.student, run, inputs, quiet)["pairs"]
    laps.lap("pairs")
    train_ds, heldout_ds, counts = prepare_pairs(
        parquet.read(cfg.layout().pairs(1)), PairText(inputs.student_path, cfg.student.chat_template), cfg.train
    )
    shards = train_ds.split(cfg.train.num_workers, equal=True)
    rows["feed"] = sum(s.count() for s in shards) + heldout_ds.count()
    laps.lap("feed")
    store_peak = laps.stop()
    shutil.rmtree(folder, ignore_errors=True)
    seconds = laps.seconds
    return {
        "prompts": n,
        "driver_peak_rss_mb": _peak_rss_mb(),
        "driver_rss_after_mb": laps.rss,
        "object_store_peak_mb": store_peak,
        "seconds": seconds,
        "rows": rows,
        "counts": counts,
        "rows_per_s": {s: rows[s if s != "checks" else "prompts"] / seconds[s] for s in STAGES},
    }


STREAM_STEPS = 20  # --stream: optimizer steps trained; the rest of the stream is generated, written and counted


def measure_stream(n: int, max_tokens: int, batch_size: int) -> dict:
    """train.stream at `n` prompts: the student engines' pairs feed the trainer (STREAM_STEPS steps of it, so that
    what is measured is the stream's data path, not this machine's training speed) and are written to pairs/ on the
    way; then the commit. Figures: pair files, commit seconds, driver RSS."""
    from plad_ray.data import storage
    from plad_ray.generate.student import commit_pairs, pair_stream
    from plad_ray.generate.teacher import generate_teacher
    from plad_ray.pipeline import prepare
    from plad_ray.train.driver import train_student

    folder, cfg = _run(
        n,
        max_tokens,
        batch_size,
        "train.stream=true",
        f"train.max_steps={STREAM_STEPS}",
        "train.eval_every_steps=0",
        "train.trackers=[]",
        "cluster.num_cpus=5",
    )
    quiet = lambda line: None  # noqa: E731
    laps = _Laps(f"{n} prompts, stream")
    inputs = prepare(cfg, generation=True, training=True, log=quiet)
    laps.lap("checks")
    run = cfg.context()
    generate_teacher(cfg.teacher, run, inputs, quiet)
    laps.lap("teacher")
    stream = pair_stream(cfg.student, run, inputs, cfg.train.seed, quiet)
    trained = train_student(cfg.train, cfg.student, run, inputs, cfg.teacher.sampling.stop, quiet, stream=stream)
    laps.lap("stream")
    committed = commit_pairs(cfg.student, run, 1, time.perf_counter(), quiet)
    laps.lap("commit")
    files = len(storage.manifest(cfg.layout().pairs(1))["files"])
    store_peak = laps.stop()
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "prompts": n,
        "mode": "stream",
        "pair_files": files,
        "pairs": committed["pairs"],
        "steps": trained["steps"],
        "untrained": trained["counts"]["untrained"],
        "driver_peak_rss_mb": _peak_rss_mb(),
        "driver_rss_after_mb": laps.rss,
        "object_store_peak_mb": store_peak,
        "seconds": laps.seconds,
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from plad_ray.evaluation.report import png_bytes

    sizes = [r["prompts"] for r in results]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(sizes, [r["driver_peak_rss_mb"] for r in results], marker="o", label="driver peak RSS")
    left.plot(sizes, [r["object_store_peak_mb"] for r in results], marker="s", label="object store peak")
    left.set(xscale="log", xlabel="prompts", ylabel="MB", title="memory")
    left.legend()
    for stage in STAGES:
        right.plot(sizes, [1000 * r["seconds"][stage] / r["prompts"] for r in results], marker="o", label=stage)
    right.set(xscale="log", yscale="log", xlabel="prompts", ylabel="seconds per 1k prompts", title="time")
    right.legend()
    figure.tight_layout()
    path.write_bytes(png_bytes(figure))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--max-tokens", type=int, default=2, help="generated tokens per output (teacher and student)")
    parser.add_argument("--batch-size", type=int, default=256, help="engine batch size (teacher and student)")
    parser.add_argument(
        "--stream",
        action="store_true",
        help=f"train.stream instead: pairs fed to the trainer ({STREAM_STEPS} steps) and written on "
        "the way; pair files, commit seconds and driver RSS per size",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one size (JSON arguments)
    args = parser.parse_args()
    if args.one:
        return answer_one(args.one, _measure, TAG)
    if args.stream:
        return main_stream(args)
    results = []
    for n in args.sizes:
        print(f"[scale] {n} prompts ...", file=sys.stderr, flush=True)
        results.append(
            in_fresh_process(
                "benchmarks.scale",
                TAG,
                {"n": n, "max_tokens": args.max_tokens, "batch_size": args.batch_size},
                f"the {n}-prompt run failed",
            )
        )
    rows = [
        {
            "prompts": r["prompts"],
            "driver peak RSS MB": r["driver_peak_rss_mb"],
            "object store peak MB": r["object_store_peak_mb"],
            **{f"{s} s": r["seconds"][s] for s in STAGES},
            **{f"{s} rows/s": r["rows_per_s"][s] for s in STAGES},
        }
        for r in results
    ]
    print(table(rows, list(rows[0])))
    path = save("scale", {"max_tokens": args.max_tokens, "batch_size": args.batch_size, "results": results})
    png = RESULTS / (path.stem + ".png")
    plot(results, png)
    print(f"results: {path}, {png}")


def _measure(stream: bool = False, **kwargs) -> dict:
    return measure_stream(**kwargs) if stream else measure(**kwargs)


def main_stream(args) -> None:
    results = []
    for n in args.sizes:
        print(f"[scale] {n} prompts, stream ...", file=sys.stderr, flush=True)
        results.append(
            in_fresh_process(
                "benchmarks.scale",
                TAG,
                {"n": n, "max_tokens": args.max_tokens, "batch_size": args.batch_size, "stream": True},
                f"the {n}-prompt stream run failed",
            )
        )
    rows = [
        {
            "prompts": r["prompts"],
            "pair files": r["pair_files"],
            "commit s": r["seconds"]["commit"],
            "driver peak RSS MB": r["driver_peak_rss_mb"],
            "object store peak MB": r["object_store_peak_mb"],
            "stream s": r["seconds"]["stream"],
            "steps": r["steps"],
            "untrained": r["untrained"],
        }
        for r in results
    ]
    print(table(rows, list(rows[0])))
    path = save("scale-stream", {"max_tokens": args.max_tokens, "batch_size": args.batch_size, "results": results})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
