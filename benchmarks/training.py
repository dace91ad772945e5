"""Training throughput: a bare DeepSpeed loop vs plad-ray's Ray Train workers vs TRL's CPOTrainer(hinge).

    pip install -e ".[bench]"                          # TRL, only for this benchmark
    python -m benchmarks.training --setting smoke      # a few minutes on 2 CPU cores
    python -m benchmarks.training --setting full --model /mnt/shared/models/Qwen2.5-0.5B

Same pairs, model, max_length, micro batch (pairs per step), AdamW learning rate and
precision on all three, one process/worker each:
  (a) bare:     one process, `deepspeed.initialize`, the project's loss code, batches
                pre-tokenized in memory in the order (b) sees them;
  (b) plad-ray: `plad_ray.train.driver.run_training` (Ray Data tokenization, TorchTrainer,
                one DeepSpeed worker), as `jobs.train` runs it;
  (c) TRL:      `CPOTrainer(loss_type="hinge", beta=1, cpo_alpha=0)`, the same loss: with
                summed log-probs, relu(1 - (log P(y+) - log P(y-))).
  (d) plad-ray with `train.packing`: (b) with each micro-batch's sequences packed into fewer
                rows (the same pairs per step and the same log-probs; less padding).
Metric: real (non-padding) tokens per second over the timed steps (after warm-up
steps); mean step time; peak RSS of the training process; padding share; the training
process's CPU seconds in the timed steps, as a share of the cores it may use and as real
tokens per CPU second (the loop's own cost, apart from what other processes took); for
(b) and (d), the seconds per step the worker waited for its batches; with
--peak-flops (one device's dense peak FLOP/s in the precision trained, e.g. 312e12 for an
A100 in bf16), MFU = 6 * parameters * tokens/s / peak (each contender trains on one device).
"""

import argparse
import json
import os
import random
import resource
import string
import tempfile
import time
from pathlib import Path

from benchmarks.common import bench_parser, mfu, parameter_count, run_worker, save, setting_and_model, table

SETTINGS = {
    "smoke": dict(
        model="bench-25m",
        pairs=480,
        micro_batch=8,
        steps=60,
        warmup_steps=10,
        max_length=256,
        precision="fp32",
        lr=1e-4,
        ray_cpus=4,
        cpus_per_worker=2,
        use_gpu=False,
    ),
    "full": dict(
        model=None,
        pairs=2400,
        micro_batch=8,
        steps=300,
        warmup_steps=30,
        max_length=1024,
        precision="bf16",
        lr=1e-6,
        ray_cpus=None,
        cpus_per_worker=8,
        use_gpu=True,
    ),
}


def write_pairs(folder: Path, n: int, seed: int = 0) -> Path:
    """Text pairs of realistic, varied lengths (prompt 32-160 bytes, responses 16-200)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from plad_ray.generate.schemas import PAIR_SCHEMA

    rng = random.Random(seed)
    text = lambda lo, hi: "".join(rng.choice(string.ascii_lowercase + "  ") for _ in range(rng.randint(lo, hi)))  # noqa: E731
    rows = [
        {
            "id": f"b{i:06d}",
            "sample_index": 0,
            "prompt": text(32, 160) + ">",
            "chosen": text(16, 200),
            "rejected": text(16, 200),
            "chosen_num_tokens": 0,
            "rejected_num_tokens": 0,
            "chosen_finish_reason": "eos",
            "rejected_finish_reason": "eos",
            "teacher_model": "bench",
            "student_model": "bench",
            "teacher_sampling": "{}",
            "student_sampling": "{}",
            "heldout": False,
        }
        for i in range(n)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), folder / "pairs.parquet")
    return folder


def plan(s: dict, parameters: int) -> str:
    """What one contender will train: the line printed before the run (the run-sheet's expected tokens)."""
    most = s["steps"] * s["micro_batch"] * 2 * s["max_length"]
    return (
        f"plan: {parameters / 1e6:,.1f}M parameters; {s['steps']} steps ({s['warmup_steps']} warm-up) x "
        f"{s['micro_batch']} pairs, chosen + rejected of up to {s['max_length']} tokens: at most {most:,} tokens "
        f"per contender, {s['precision']}, {'one GPU' if s['use_gpu'] else 'CPU'} each"
    )


def train_config(s: dict, steps: int, packing: bool = False):
    from plad_ray.config import LossConfig, TrainConfig

    # cpus_per_worker: Ray caps a worker's OMP/torch threads at its CPUs; (a) and (c) get the whole machine.
    return TrainConfig(
        num_workers=1,
        cpus_per_worker=s["cpus_per_worker"],
        zero_stage=0,
        precision=s["precision"],
        micro_batch_size=s["micro_batch"],
        num_epochs=max(1, -(-steps * s["micro_batch"] // s["pairs"])),
        learning_rate=s["lr"],
        max_length=s["max_length"],
        log_every_steps=1,
        trackers=[],
        eval_every_steps=0,
        packing=packing,
        loss=LossConfig(type="hinge", beta=1.0, nll_weight=0.0),
    )  # = TRL CPO hinge with cpo_alpha=0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rate(step_tokens: list[int], step_seconds: list[float], warmup: int, step_cpu: list[float], cores: int) -> dict:
    """Tokens/s over the timed steps; and the CPU seconds the training process used in them: `cpu_share` of
    the cores it may use (below 1: other processes took the rest), `tokens_per_cpu_s` (the loop's own cost)."""
    tokens, seconds, cpu = sum(step_tokens[warmup:]), sum(step_seconds[warmup:]), sum(step_cpu[warmup:])
    return {
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / len(step_seconds[warmup:]),
        "timed_steps": len(step_seconds[warmup:]),
        "cpu_share": cpu / (seconds * cores),
        "tokens_per_cpu_s": tokens / cpu,
    }


def run_plad(s: dict, model: str, pairs_dir: Path, out: Path, packing: bool = False) -> tuple[dict, list]:
    """(b) (or (d), with `packing`) and the batches it trained on, in order (for (a))."""
    import ray

    from plad_ray.train.driver import run_training
    from plad_ray.train.plan import TrainPlan
    from plad_ray.train.prepare import PairText, prepare_pairs, trained_statuses

    ray.init(address="local", num_cpus=s["ray_cpus"], include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        cfg = train_config(s, s["steps"], packing)
        pairs = ray.data.read_parquet(str(pairs_dir))
        start = time.perf_counter()
        plan = TrainPlan(
            train=cfg,
            model_path=model,
            export_uri=str(out / "student"),
            tracking=None,
            pad_id=0,
            run_dir=str(out.absolute()),
            trained_statuses=trained_statuses(cfg),
        )
        report = run_training(pairs, plan, PairText(model), s["use_gpu"])
        wall = time.perf_counter() - start
        train_ds, _, counts = prepare_pairs(pairs, PairText(model), cfg)
        rows = train_ds.take_all()
    finally:
        ray.shutdown()
    curve = report["curve"][: s["steps"]]
    step_tokens = [c["tokens"] for c in curve]
    step_seconds = [c["seconds"] for c in curve]
    result = {
        **rate(step_tokens, step_seconds, s["warmup_steps"], [c["cpu_s"] for c in curve], s["cpus_per_worker"]),
        "data_s_per_step": sum(c["data_s"] for c in curve) / len(curve),
        "wall_s": wall,
        "padding": sum(c["padding"] for c in curve) / len(curve),
        "peak_rss_mb": report.get("peak_rss_mb"),
    }
    return result, rows


def run_bare(s: dict, model: str, rows: list) -> dict:
    """(a) in a fresh process: deepspeed.initialize and the loss, nothing else."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(
            {
                "s": s,
                "model": model,
                "rows": [{k: list(map(int, r[k])) for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows],
            },
            f,
        )
    return run_worker("benchmarks.training", "--bare-worker", f.name, "BARE", "bare DeepSpeed run failed")


def bare_worker(path: str) -> None:
    import deepspeed
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from plad_ray.losses import Sequences, plad_loss, sequence_logps
    from plad_ray.train.batching import collate_pairs, length_grouped, ragged
    from plad_ray.train.ds_config import deepspeed_config

    job = json.loads(Path(path).read_text())
    s, rows = job["s"], job["rows"]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    cfg = train_config(s, s["steps"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, 1))
    step_tokens, step_seconds, step_cpu = [], [], []
    mb = cfg.micro_batch_size
    group = mb * cfg.length_grouping  # the same length-grouped micro-batches (b) trains on
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    micro = []
    for index, begin in enumerate(range(0, len(rows), group)):
        bucket = {k: ragged([np.array(r[k]) for r in rows[begin : begin + group]]) for k in columns}
        micro += length_grouped(bucket, mb, seed=[cfg.seed, 0, index])
    for step in range(s["steps"]):
        start, cpu = time.perf_counter(), time.process_time()
        batch = collate_pairs(micro[step % len(micro)], pad_id=0)
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps, n = sequence_logps(logits, batch["input_ids"], batch["response_mask"])
        loss = plad_loss(Sequences(logps[:mb], n[:mb]), Sequences(logps[mb:], n[mb:]), cfg.loss)["loss"]
        engine.backward(loss)
        engine.step()
        step_seconds.append(time.perf_counter() - start)
        step_cpu.append(time.process_time() - cpu)
        step_tokens.append(int(batch["attention_mask"].sum()))
    print(
        "BARE "
        + json.dumps(
            {
                **rate(step_tokens, step_seconds, s["warmup_steps"], step_cpu, os.cpu_count()),
                "peak_rss_mb": peak_rss_mb(),
            }
        ),
        flush=True,
    )


def run_trl(s: dict, model: str, pairs_dir: Path) -> dict:
    """(c) in a fresh process."""
    return run_worker(
        "benchmarks.training",
        "--trl-worker",
        json.dumps({"s": s, "model": model, "pairs": str(pairs_dir)}),
        "TRL",
        "TRL run failed (pip install -e '.[bench]'?)",
    )


def trl_worker(job: dict) -> None:
    import datasets
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    s = job["s"]
    table_ = pq.read_table(Path(job["pairs"]) / "pairs.parquet", columns=["prompt", "chosen", "rejected"])
    dataset = datasets.Dataset(table_)
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(job["model"])
    step_tokens, step_seconds, step_cpu, started = [], [], [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            started.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kwargs):
            step_seconds.append(time.perf_counter() - started[-1][0])
            step_cpu.append(time.process_time() - started[-1][1])

    with tempfile.TemporaryDirectory() as out:
        args = CPOConfig(
            output_dir=out,
            per_device_train_batch_size=s["micro_batch"],
            max_steps=s["steps"],
            learning_rate=s["lr"],
            loss_type="hinge",
            beta=1.0,
            cpo_alpha=0.0,
            max_length=s["max_length"],
            bf16=s["precision"] == "bf16",
            use_cpu=not s["use_gpu"],
            report_to=[],
            logging_steps=10,
            save_strategy="no",
            dataloader_num_workers=0,
            lr_scheduler_type="linear",
            warmup_steps=0,
            seed=0,
        )
        trainer = CPOTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()]
        )
        collate = trainer.data_collator

        def counting(features):
            batch = collate(features)
            step_tokens.append(int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()))
            return batch

        trainer.data_collator = counting
        trainer.train()
    print(
        "TRL "
        + json.dumps(
            {
                **rate(step_tokens[: len(step_seconds)], step_seconds, s["warmup_steps"], step_cpu, os.cpu_count()),
                "peak_rss_mb": peak_rss_mb(),
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = bench_parser(__doc__, SETTINGS)
    parser.add_argument("--peak-flops", type=float, help="one device's dense peak FLOP/s, for MFU (e.g. 312e12)")
    parser.add_argument("--bare-worker", help=argparse.SUPPRESS)
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_worker:
        return bare_worker(args.bare_worker)
    if args.trl_worker:
        return trl_worker(json.loads(args.trl_worker))
    s, model = setting_and_model(parser, args, SETTINGS)
    parameters = parameter_count(model)
    print(plan(s, parameters), flush=True)
    with tempfile.TemporaryDirectory() as work:
        pairs_dir = write_pairs(Path(work) / "pairs", s["pairs"])
        plad, rows = run_plad(s, model, pairs_dir, Path(work) / "run")
        bare = run_bare(s, model, rows)
        trl = run_trl(s, model, pairs_dir)
        packed, _ = run_plad(s, model, pairs_dir, Path(work) / "run-packed", packing=True)
    results = [
        {"contender": "(a) bare DeepSpeed loop", **bare},
        {"contender": "(b) plad-ray Ray Train + DeepSpeed", **plad},
        {"contender": "(c) TRL CPOTrainer(hinge)", **trl},
        {"contender": "(d) plad-ray, train.packing", **packed},
    ]
    for r in results:
        r["mfu"] = mfu(r["tokens_per_s"], parameters, args.peak_flops)
    ratios = {
        "b_over_a": plad["tokens_per_s"] / bare["tokens_per_s"],
        "b_over_c": plad["tokens_per_s"] / trl["tokens_per_s"],
        "d_over_a": packed["tokens_per_s"] / bare["tokens_per_s"],
        "d_over_c": packed["tokens_per_s"] / trl["tokens_per_s"],
    }
    print(
        table(
            results,
            [
                "contender",
                "tokens_per_s",
                "mfu",
                "step_s",
                "timed_steps",
                "peak_rss_mb",
                "padding",
                "cpu_share",
                "tokens_per_cpu_s",
                "data_s_per_step",
            ],
        )
    )
    print("   ".join(f"ratio ({k[0]})/({k[-1]}) = {v:.3f}" for k, v in ratios.items()))
    print(
        "results -> "
        + save(
            "training",
            {
                "setting": args.setting,
                "settings": s,
                "model": model,
                "parameters": parameters,
                "peak_flops": args.peak_flops,
                "results": results,
                "ratios": ratios,
            },
        )
    )


if __name__ == "__main__":
    main()
