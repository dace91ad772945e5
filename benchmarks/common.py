"""What the benchmarks share: models built here, prompt sets, tables and JSON results.

Every benchmark measures its contenders side by side in one run on one machine, prints
a table and writes JSON to benchmarks/results/. Timings live here, never in tests.
"""

import collections
import json
import os
import platform
import random
import re
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# A random-weight Llama for throughput (outputs are noise; speed is what is measured).
# head_dim 64 (vLLM's CPU attention rejects smaller heads).
BENCH_MODELS = {
    "bench-4m": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4),
    "bench-25m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8),
}


def build_bench_model(name: str, folder: Path) -> str:
    """A Llama of preset `name` with random weights (seed 0) and the tiny byte tokenizer, saved as HF."""
    if (folder / "model.safetensors").is_file():
        return str(folder)
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from plad_ray.models import tiny

    torch.manual_seed(0)
    shape = BENCH_MODELS[name]
    config = LlamaConfig(
        vocab_size=tiny.VOCAB_SIZE,
        head_dim=64,
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tiny.PAD_ID,
        bos_token_id=tiny.BOS_ID,
        eos_token_id=tiny.EOS_ID,
        **shape,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tiny.BOS_ID, eos_token_id=tiny.EOS_ID, pad_token_id=tiny.PAD_ID
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tiny.build_tokenizer().save_pretrained(folder)
    return str(folder)


def parameter_count(model: str) -> int:
    """Parameters of an HF causal LM folder, counted on the meta device (no weights loaded; tied ones once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in net.parameters())


def mfu(tokens_per_s: float, parameters: int, peak_flops: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation of training: 6 * N * tokens/s (2N forward and 4N backward FLOPs per token;
    attention's own FLOPs left out, as in the usual 6N estimate) over the devices' peak FLOP/s (the dense
    peak of the precision trained in, per device, e.g. 312e12 for an A100's bf16). None without a peak."""
    if not peak_flops:
        return None
    return 6 * parameters * tokens_per_s / (peak_flops * devices)


def per_device(tokens_per_s: float, devices: int | None) -> float | None:
    """Tokens/s per accelerator (None on CPU, where the machine's cores are shared by every contender)."""
    return tokens_per_s / devices if devices else None


def random_prompts(n: int, length: int, seed: int = 0) -> list[str]:
    """n prompts of `length` printable characters (= tokens with the byte tokenizer)."""
    rng = random.Random(seed)
    return [
        " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8))) for _ in range(length))[
            :length
        ]
        for _ in range(n)
    ]


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": _cpu_model(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **result}, indent=2))
    return path


def in_fresh_process(module: str, tag: str, kwargs: dict, failure: str) -> dict:
    """`python -m module --one '<kwargs as JSON>'` in a fresh process (its own peak RSS, its own Ray);
    the module's main answers with `answer_one`."""
    return run_worker(module, "--one", json.dumps(kwargs), tag, failure)


def answer_one(one: str, measure, tag: str) -> None:
    """The fresh process's side of `in_fresh_process`: measure(**kwargs), printed after `tag `."""
    print(f"{tag} {json.dumps(measure(**json.loads(one)))}", flush=True)


PROGRESS = re.compile(r"^\[[a-z_-]+\] ")  # a benchmark's own progress lines ("[scale] ..."), not Ray's or vLLM's


def run_worker(module: str, flag: str, arg: str, tag: str, failure: str) -> dict:
    """Run `python -m module flag arg` in a fresh process; its result is the JSON after `tag ` on stdout. Its own
    progress lines on stderr are passed on as they come (a 1M-prompt size runs for an hour); the rest of its stderr
    is kept for the failure message."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, flag, arg], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    stdout = []
    reader = threading.Thread(target=lambda: stdout.extend(proc.stdout), daemon=True)  # a full pipe would stall it
    reader.start()
    watchdog = threading.Timer(4 * 3600, proc.kill)  # a worker hung past 4 hours ends as a failure
    watchdog.start()
    tail = collections.deque(maxlen=200)
    for line in proc.stderr:
        tail.append(line)
        if PROGRESS.match(line):
            print(line, end="", file=sys.stderr, flush=True)
    proc.wait()
    watchdog.cancel()
    reader.join()
    result = [line for line in stdout if line.startswith(f"{tag} ")]
    if proc.returncode != 0 or not result:
        raise RuntimeError(f"{failure}: {''.join(tail)[-3000:]}")
    return json.loads(result[-1][len(tag) + 1 :])


def bench_parser(doc: str, settings: dict):
    """The arguments every throughput benchmark takes: --setting and --model."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=settings, default="smoke")
    parser.add_argument("--model", help="HF model folder (full setting); smoke builds a random bench model")
    return parser


def setting_and_model(parser, args, settings: dict) -> tuple[dict, str]:
    """The chosen setting and its model: --model, else the setting's random bench model (built once)."""
    s = settings[args.setting]
    model = args.model or (build_bench_model(s["model"], RESULTS / "models" / s["model"]) if s["model"] else None)
    if model is None:
        parser.error("--model is required for the full setting")
    return s, model
