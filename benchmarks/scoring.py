"""Teacher scoring throughput: raw vLLM prompt-log-prob scoring vs the project's scoring stage.

    python -m benchmarks.scoring --setting smoke     # a few minutes on 2 CPU cores
    python -m benchmarks.scoring --setting full --model /mnt/shared/models/Llama-2-7b-hf

The same sequences (a prompt + a response of random ids) and the same request on both sides: one
prefill with `prompt_logprobs=k`, then the one token vLLM must sample (max_tokens 1, greedy, not
detokenized):
  (c) raw:   one `vllm.LLM`, a warm-up call, then `generate` on every sequence's token ids in one call;
  (d) stage: `plad_ray.generate.scores.teacher_scores` (ray.data.llm, then the read into top-k columns)
             on a local Ray cluster, streamed; its steady rate counts the tokens of every output block
             after the first over the time from the first block to the last.
Rates are prefill tokens (prompt + response) per second; the ratio (d)/(c) of steady rates is the
stage's overhead. `make bench-generation` runs it after the generation benchmark.
"""

import argparse
import json
import random
import time

from benchmarks.common import bench_parser, per_device, random_prompts, run_worker, save, setting_and_model, table

SETTINGS = {
    "smoke": dict(
        model="bench-4m",
        sequences=1024,
        prompt_len=32,
        response_len=64,
        top_k=20,
        batch_size=64,
        replicas=1,
        cpus_per_replica=2,
        ray_cpus=6,
        use_gpu=False,
        dtype="float32",
        max_model_len=256,
        engine_kwargs={"kv_cache_memory_bytes": 512 << 20, "enforce_eager": True},
    ),
    "full": dict(
        model=None,
        sequences=20000,
        prompt_len=512,
        response_len=256,
        top_k=20,
        batch_size=256,
        replicas=1,
        cpus_per_replica=8,
        ray_cpus=None,
        use_gpu=True,
        dtype="bfloat16",
        max_model_len=2048,
        engine_kwargs={},
    ),
}


def plan(s: dict) -> str:
    tokens = s["sequences"] * (s["prompt_len"] + s["response_len"])
    return (
        f"plan: {s['sequences']:,} sequences of {s['prompt_len']} prompt + {s['response_len']} response tokens, top "
        f"{s['top_k']} log-probs per response token: about {tokens:,} prefill tokens per contender run; "
        f"{s['dtype']}, {'GPUs' if s['use_gpu'] else 'CPU'}"
    )


def sequences(s: dict, model: str) -> list[dict]:
    """Rows as the scoring stage reads them (a student sample each), with their response ids fixed here."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(model).vocab_size
    rng = random.Random(0)
    return [
        {
            "id": f"p{i}",
            "sample_index": 0,
            "side": "rejected",
            "prompt": prompt,
            "text": "",
            "finish_reason": "length",
            "generated_ids": [rng.randrange(3, vocab) for _ in range(s["response_len"])],
        }
        for i, prompt in enumerate(random_prompts(s["sequences"], s["prompt_len"]))
    ]


def engine_config(s: dict, model: str):
    from plad_ray.config import TeacherEngineConfig

    return TeacherEngineConfig(
        model=model,
        replicas=s["replicas"],
        cpus_per_replica=s["cpus_per_replica"],
        batch_size=s["batch_size"],
        max_model_len=s["max_model_len"],
        dtype=s["dtype"],
        gpu_memory_utilization=0.9 if s["use_gpu"] else 0.2,
        engine_kwargs=dict(s["engine_kwargs"]),
        score_samples=True,
        score_top_k=s["top_k"],
    )


def raw_worker(s: dict) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams, TokensPrompt

    from plad_ray.data.prompts import prompt_token_ids
    from plad_ray.generate.engines import engine_kwargs

    rows = sequences(s, s["model"])
    tokenizer = AutoTokenizer.from_pretrained(s["model"])
    prompts = prompt_token_ids(tokenizer, [r["prompt"] for r in rows], False)
    requests = [TokensPrompt(prompt_token_ids=list(p) + r["generated_ids"]) for p, r in zip(prompts, rows)]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=s["top_k"], detokenize=False)
    start = time.perf_counter()
    llm = LLM(model=s["model"], **engine_kwargs(engine_config(s, s["model"]), s["use_gpu"]))
    ready = time.perf_counter()
    llm.generate(requests[:32], params, use_tqdm=False)  # warm-up
    warm = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    end = time.perf_counter()
    tokens = sum(len(o.prompt_token_ids) for o in outputs)
    assert all(len(o.prompt_logprobs) == len(o.prompt_token_ids) for o in outputs)
    print(
        "RAW "
        + json.dumps(
            {
                "startup_s": ready - start,
                "score_s": end - warm,
                "tokens": tokens,
                "sequences": len(outputs),
                "steady_tokens_per_s": tokens / (end - warm),
                "cold_tokens_per_s": tokens / (ready - start + end - warm),
            }
        ),
        flush=True,
    )


def run_stage(s: dict, model: str) -> dict:
    """(d) the scoring stage as the pipeline runs it, on a fresh local Ray cluster."""
    import pyarrow as pa
    import ray

    from plad_ray.generate.engines import split_for_replicas
    from plad_ray.generate.scores import SequenceIds, teacher_scores

    rows = sequences(s, model)
    ray.init(address="local", num_cpus=s["ray_cpus"], include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        engine = engine_config(s, model)
        ds = split_for_replicas(
            ray.data.from_arrow(pa.Table.from_pylist(rows)), len(rows), engine.batch_size, engine.replicas
        )
        ids = SequenceIds(model, False, False, engine.max_model_len, {"chosen": None, "rejected": None})
        out = teacher_scores(ds, ids, engine, model, s["use_gpu"])
        start = time.perf_counter()
        first, n, tokens, after_tokens = None, 0, 0, 0
        for block in out.iter_batches(batch_size=None, batch_format="pyarrow"):
            now = time.perf_counter()
            t = int(
                pa.compute.sum(block.column("prompt_tokens")).as_py()
                + pa.compute.sum(block.column("num_tokens")).as_py()
            )
            n, tokens = n + block.num_rows, tokens + t
            if first is None:
                first = now
            else:
                after_tokens += t
        end = time.perf_counter()
    finally:
        ray.shutdown()
    return {
        "tokens": tokens,
        "sequences": n,
        "first_block_s": first - start,
        "steady_tokens_per_s": after_tokens / (end - first),
        "cold_tokens_per_s": tokens / (end - start),
    }


def main() -> None:
    parser = bench_parser(__doc__, SETTINGS)
    parser.add_argument("--raw-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_worker:
        return raw_worker(json.loads(args.raw_worker))
    s, model = setting_and_model(parser, args, SETTINGS)
    print(plan(s), flush=True)
    raw = run_worker(
        "benchmarks.scoring", "--raw-worker", json.dumps({**s, "model": model}), "RAW", "raw vLLM scoring run failed"
    )
    stage = run_stage(s, model)
    gpus = 1 if s["use_gpu"] else None
    rows = [
        {
            "contender": "(c) raw vllm.LLM.generate, prompt_logprobs",
            **raw,
            "steady_tokens_per_s_per_gpu": per_device(raw["steady_tokens_per_s"], gpus),
        },
        {
            "contender": "(d) scoring stage (ray.data.llm + top-k read)",
            **stage,
            "steady_tokens_per_s_per_gpu": per_device(stage["steady_tokens_per_s"], gpus),
            "ratio_d_over_c": stage["steady_tokens_per_s"] / raw["steady_tokens_per_s"],
        },
    ]
    print(
        table(
            rows,
            [
                "contender",
                "sequences",
                "tokens",
                "steady_tokens_per_s",
                "steady_tokens_per_s_per_gpu",
                "cold_tokens_per_s",
                "ratio_d_over_c",
            ],
        )
    )
    path = save("scoring", {"setting": args.setting, "settings": s, "model": model, "raw": raw, "stage": stage})
    print(f"results -> {path}")


if __name__ == "__main__":
    main()
