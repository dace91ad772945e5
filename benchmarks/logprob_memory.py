"""Peak memory of the sequence log-probs at a large vocabulary: the dense formula vs plad-ray's chunks.

    python -m benchmarks.logprob_memory                      # 152k vocab x 1,024 tokens x micro-batch 4, bf16
    python -m benchmarks.logprob_memory --vocab 32000 --micro-batch 8 --dtype fp32

What a training micro-batch does after the model's forward: log-probs of the scored (response)
tokens of 2B sequences (B chosen + B rejected) from logits [2B, T, V], then backward to the
logits. Each variant runs in a fresh process that first allocates the logits (as the model's
forward would) and then measures the peak resident memory *above* that point (ru_maxrss minus
the RSS with the logits in hand), and the seconds of forward + backward:
  dense:   plad_ray.losses.dense_sequence_logps (gather - logsumexp over an fp32 copy of [2B, T, V]);
  chunked: plad_ray.losses.sequence_logps (what the workers call: scored positions only, in chunks).
Both must give the same log-probs and logits gradient (checked here on fingerprints, and
exactly in tests/test_losses.py). The logits themselves and their gradient (both [2B, T, V]
in the logits' dtype) are the same for both and stay outside what is compared.
"""

import argparse
import resource
import sys
import time

from benchmarks.common import answer_one, in_fresh_process, save, table

TAG = "LOGPROB_MEMORY"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(variant: str, vocab: int, tokens: int, micro_batch: int, dtype: str, prompt_share: float) -> dict:
    import torch

    from plad_ray.losses import dense_sequence_logps, sequence_logps

    torch.manual_seed(0)
    sequences = 2 * micro_batch
    logits = torch.empty(sequences, tokens, vocab, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    logits.normal_()  # touched: resident before the baseline is read
    logits.requires_grad_(True)
    input_ids = torch.randint(0, vocab, (sequences, tokens))
    prompt = int(tokens * prompt_share)
    response_mask = torch.zeros(sequences, tokens, dtype=torch.long)
    for row in range(sequences):  # responses of varied length after the prompt, then padding
        response_mask[row, prompt: prompt + (tokens - prompt) * (row + 1) // sequences] = 1
    fn = dense_sequence_logps if variant == "dense" else sequence_logps
    baseline_mb = _rss_mb()
    start = time.perf_counter()
    logps, num_tokens = fn(logits, input_ids, response_mask)
    forward_s = time.perf_counter() - start
    logps.sum().backward()
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "peak_above_logits_mb": peak_mb - baseline_mb, "logits_mb": logits.nbytes / 2**20,
            "forward_s": forward_s, "forward_backward_s": seconds, "scored_tokens": int(num_tokens.sum()),
            "logps": logps.tolist(), "grad_abs_sum": float(logits.grad.float().abs().sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=152064)  # Qwen2.5's padded vocabulary
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=4, help="pairs: 2x this many sequences")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--prompt-share", type=float, default=0.25, help="leading positions that are prompt")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant (JSON arguments)
    args = parser.parse_args()
    if args.one:
        return answer_one(args.one, measure, TAG)
    shape = dict(vocab=args.vocab, tokens=args.tokens, micro_batch=args.micro_batch, dtype=args.dtype,
                 prompt_share=args.prompt_share)
    rows = []
    for variant in ("dense", "chunked"):
        print(f"[logprob-memory] {variant}: {2 * args.micro_batch} x {args.tokens} x {args.vocab} {args.dtype} ...",
              file=sys.stderr, flush=True)
        rows.append(in_fresh_process("benchmarks.logprob_memory", TAG, {"variant": variant, **shape},
                                     f"the {variant} variant failed"))
    dense, chunked = rows
    logps_diff = max(abs(a - b) / max(abs(a), 1.0) for a, b in zip(dense["logps"], chunked["logps"]))
    grad_diff = abs(dense["grad_abs_sum"] - chunked["grad_abs_sum"]) / dense["grad_abs_sum"]
    ratio = dense["peak_above_logits_mb"] / max(chunked["peak_above_logits_mb"], 1.0)
    for row in rows:
        row.pop("logps")
    print(table(rows, ["variant", "logits_mb", "peak_above_logits_mb", "forward_s", "forward_backward_s",
                       "scored_tokens"]))
    print(f"peak memory above the logits: dense / chunked = {ratio:.1f}x; max relative log-prob difference "
          f"{logps_diff:.2e}, relative difference of the gradient's L1 norm {grad_diff:.2e}")
    path = save("logprob-memory", {"shape": shape, "rows": rows, "dense_over_chunked_peak": ratio,
                                   "max_rel_logp_diff": logps_diff, "rel_grad_l1_diff": grad_diff})
    print(f"results: {path}")
    if logps_diff > 1e-5 or grad_diff > 1e-5:
        sys.exit(f"the chunked log-probs differ from the dense ones ({logps_diff:.2e}, {grad_diff:.2e}): a bug")


if __name__ == "__main__":
    main()
