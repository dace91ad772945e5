"""Peak memory of the terms that read the logits' vocabulary axis: the dense formulas vs plad-ray's chunks.

    python -m benchmarks.logprob_memory      # 4 terms, 152k vocab x 1,024 tokens x micro-batch 8, bf16
    python -m benchmarks.logprob_memory --losses sequence --micro-batch 4 --vocab 32000 --dtype fp32

What a training micro-batch of B pairs does after the model's forward, per term (--losses):
  sequence:     log-probs of the scored (response) tokens of 2B sequences from logits [2B, T, V]
                (dense_sequence_logps vs sequence_logps: every ranking loss);
  onpolicy_kd:  the student's log-probs of the teacher's top-k on the B samples' response tokens, then
                reverse KL (dense_topk_token_logps over all 2B rows, as the trainer did, vs topk_token_logps);
  contrastive:  the same on both sides, then contrastive_topk_loss;
  token_kd:     KL(p_T || p_S) on the B teacher outputs from student logits [B, T, V] and the frozen fp32
                teacher's logits [B, T, V] (dense_token_kd_loss vs token_kd_loss).
Then backward to the student logits. Each (term, variant, size) runs in a fresh process that first
allocates the inputs (as the forwards would) and then measures the peak resident memory *above* them
(ru_maxrss minus the RSS with the inputs in hand) and the seconds of forward + backward. The process's
address space is capped at what the machine has free (minus --margin-gb) when it starts, so a variant
that does not fit fails its allocation instead of waking the OOM killer; a dense variant that does not
fit is reported as such and run again at half the micro-batch until it fits, with the chunked one
beside it at that size. Dense and chunked must agree (loss or log-probs, and the gradient's L1 norm,
within 1e-5 relative; exactly in tests/test_losses*.py). The inputs are the same for both and outside
what is compared; the student logits' gradient (in their dtype, needed by the lm_head's backward) is
inside it for both.
"""

import argparse
import resource
import sys
import time

from benchmarks.common import answer_one, in_fresh_process, save, table

TAG = "LOGPROB_MEMORY"
LOSSES = ("sequence", "onpolicy_kd", "contrastive", "token_kd")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _cap_address_space(margin_gb: float) -> float:
    """Limit this process to its current address space plus the machine's free memory minus a margin;
    the budget in MB."""
    with open("/proc/meminfo") as f:
        available_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    with open("/proc/self/statm") as f:
        virtual = int(f.read().split()[0]) * resource.getpagesize()
    budget = max(0, available_kb * 1024 - int(margin_gb * 2**30))
    resource.setrlimit(resource.RLIMIT_AS, (virtual + budget, virtual + budget))
    return budget / 2**20


def _inputs(loss: str, vocab: int, tokens: int, micro_batch: int, dtype: str, prompt_share: float, top_k: int):
    """The term's inputs, touched (resident before the baseline is read); the student logits need a gradient."""
    import torch

    torch.manual_seed(0)
    b = micro_batch
    sequences = b if loss == "token_kd" else 2 * b
    logits = torch.empty(sequences, tokens, vocab, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    logits.normal_().requires_grad_(True)
    prompt = int(tokens * prompt_share)
    mask = torch.zeros(sequences, tokens)
    for row in range(sequences):  # responses of varied length after the prompt, then padding
        mask[row, prompt : prompt + (tokens - prompt) * (row + 1) // sequences] = 1
    if loss == "sequence":
        return {"logits": logits, "ids": torch.randint(0, vocab, (sequences, tokens)), "mask": mask}
    if loss == "token_kd":
        return {"logits": logits, "teacher": torch.randn(b, tokens, vocab), "mask": mask}
    if loss == "onpolicy_kd":
        mask[:b] = 0  # only the samples carry the teacher's top-k
    teacher = torch.log_softmax(torch.randn(sequences, tokens - 1, top_k + 1), -1)[..., :top_k].contiguous()
    return {
        "logits": logits,
        "ids": torch.randint(0, vocab, (sequences, tokens, top_k)),
        "mask": mask,
        "teacher_topk": teacher,
    }


def _term(loss: str, variant: str, x: dict):
    """(what backward starts from, the values compared between variants, scored positions)."""
    from plad_ray import losses as L
    from plad_ray import losses_token as T

    logits, mask = x["logits"], x["mask"]
    dense = variant == "dense"
    if loss == "sequence":
        logps, num_tokens = (L.dense_sequence_logps if dense else L.sequence_logps)(logits, x["ids"], mask)
        return logps.sum(), logps.tolist(), int(num_tokens.sum())
    if loss == "token_kd":
        kd = (T.dense_token_kd_loss if dense else T.token_kd_loss)(logits, x["teacher"], mask)
        return kd, [kd.item()], int(mask[:, 1:].sum())
    student = L.dense_topk_token_logps(logits, x["ids"]) if dense else L.topk_token_logps(logits, x["ids"], mask)
    t, m, b = x["teacher_topk"], mask[:, 1:], logits.shape[0] // 2
    if loss == "onpolicy_kd":
        kd = T.topk_divergence(student[b:], t[b:], m[b:], kind="reverse_kl")
    else:
        kd = T.contrastive_topk_loss(student[:b], t[:b], m[:b], student[b:], t[b:], m[b:], alpha=0.1)
    return kd, [kd.item()], int(m.sum())


def measure(
    loss: str,
    variant: str,
    vocab: int,
    tokens: int,
    micro_batch: int,
    dtype: str,
    prompt_share: float,
    top_k: int,
    margin_gb: float,
) -> dict:
    import torch  # noqa: F401 - imported before the address space is capped

    import plad_ray.losses  # noqa: F401
    import plad_ray.losses_token  # noqa: F401

    budget_mb = _cap_address_space(margin_gb)
    row = {"loss": loss, "variant": variant, "micro_batch": micro_batch, "budget_mb": budget_mb}
    try:
        x = _inputs(loss, vocab, tokens, micro_batch, dtype, prompt_share, top_k)
        row["inputs_mb"] = sum(t.nbytes for t in x.values()) / 2**20
        baseline_mb = _rss_mb()
        start = time.perf_counter()
        out, values, scored = _term(loss, variant, x)
        row["forward_s"] = time.perf_counter() - start
        out.backward()
        row["forward_backward_s"] = time.perf_counter() - start
    except (RuntimeError, MemoryError) as e:  # an allocation past the cap: this variant does not fit here
        if "alloc" not in str(e) and not isinstance(e, MemoryError):
            raise
        return {**row, "fits": False, "error": str(e).splitlines()[0][:200]}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    grad = x["logits"].grad  # its L1 norm a sequence at a time (an fp32 copy of all of it may not fit)
    return {
        **row,
        "fits": True,
        "peak_above_inputs_mb": peak_mb - baseline_mb,
        "scored_tokens": scored,
        "values": values,
        "grad_abs_sum": sum(float(g.float().abs().sum()) for g in grad),
    }


def compare(loss: str, shape: dict, micro_batch: int, log) -> list[dict]:
    """Dense and chunked at `micro_batch`; while dense does not fit, both again at half the size."""
    rows = []
    while True:
        pair = {}
        for variant in ("dense", "chunked"):
            log(f"{loss} {variant}, micro-batch {micro_batch} ...")
            pair[variant] = in_fresh_process(
                "benchmarks.logprob_memory",
                TAG,
                {"loss": loss, "variant": variant, **shape, "micro_batch": micro_batch},
                f"{loss}: the {variant} variant failed",
            )
        dense, chunked = pair["dense"], pair["chunked"]
        if not chunked["fits"]:
            sys.exit(f"{loss}: the chunked variant does not fit at micro-batch {micro_batch}: {chunked['error']}")
        if dense["fits"]:
            a, b = dense.pop("values"), chunked.pop("values")
            chunked["rel_value_diff"] = max(abs(x - y) / max(abs(x), 1.0) for x, y in zip(a, b))
            chunked["rel_grad_l1_diff"] = abs(dense["grad_abs_sum"] - chunked["grad_abs_sum"]) / dense["grad_abs_sum"]
            chunked["dense_over_chunked_peak"] = dense["peak_above_inputs_mb"] / max(chunked["peak_above_inputs_mb"], 1)
            return rows + [dense, chunked]
        log(f"{loss} dense does not fit at micro-batch {micro_batch} in {dense['budget_mb']:,.0f} MB: {dense['error']}")
        chunked.pop("values")
        rows += [dense, chunked]
        if micro_batch == 1:
            return rows
        micro_batch //= 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated, of {', '.join(LOSSES)}")
    parser.add_argument("--vocab", type=int, default=152064)  # Qwen2.5's padded vocabulary
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=8, help="pairs: 2x this many sequences")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="of the student logits")
    parser.add_argument("--prompt-share", type=float, default=0.25, help="leading positions that are prompt")
    parser.add_argument("--top-k", type=int, default=20, help="the teacher's ids per position (teacher.score_top_k)")
    parser.add_argument("--margin-gb", type=float, default=2.0, help="free memory left to the rest of the machine")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant (JSON arguments)
    args = parser.parse_args()
    if args.one:
        return answer_one(args.one, measure, TAG)
    losses = args.losses.split(",")
    if not set(losses) <= set(LOSSES):
        parser.error(f"--losses {args.losses}: expected a comma-separated list of {', '.join(LOSSES)}")
    shape = dict(
        vocab=args.vocab,
        tokens=args.tokens,
        dtype=args.dtype,
        prompt_share=args.prompt_share,
        top_k=args.top_k,
        margin_gb=args.margin_gb,
    )
    log = lambda line: print(f"[logprob-memory] {line}", file=sys.stderr, flush=True)  # noqa: E731
    rows = [row for loss in losses for row in compare(loss, shape, args.micro_batch, log)]
    print(
        f"{args.vocab} vocabulary x {args.tokens} tokens, {args.dtype} student logits, micro-batch in pairs; peak "
        "MB above the inputs (dense rows that do not fit show '-')"
    )
    print(
        table(
            rows,
            [
                "loss",
                "variant",
                "micro_batch",
                "fits",
                "inputs_mb",
                "peak_above_inputs_mb",
                "forward_s",
                "forward_backward_s",
                "scored_tokens",
                "dense_over_chunked_peak",
                "rel_value_diff",
                "rel_grad_l1_diff",
            ],
        )
    )
    path = save("logprob-memory", {"shape": {**shape, "micro_batch": args.micro_batch}, "rows": rows})
    print(f"results: {path}")
    bad = [r for r in rows if r.get("rel_value_diff", 0) > 1e-5 or r.get("rel_grad_l1_diff", 0) > 1e-5]
    if bad:
        sys.exit(f"chunked and dense differ for {', '.join(r['loss'] for r in bad)} (more than 1e-5): a bug")


if __name__ == "__main__":
    main()
