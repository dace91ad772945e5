"""Run the worker's training loop (plad_ray.train.worker._train) on every DeepSpeed path the configs
expose, on the same pairs and seed, and record per-step losses and final fp32 weights.

    python -m torch.distributed.run --nproc_per_node 2 -m tests.support.training_paths OUT_DIR

Each variant builds a fresh DeepSpeed engine of the tiny student with `worker._initialize`
(ZeRO-3 loads through HfDeepSpeedConfig, as on a cluster), trains it with `worker._train`, gathers
its fp32 master weights with `export.full_state_dict` and, for ZeRO-3, exports it with
`export.export_hf`. Real DeepSpeed on gloo, 2 ranks; only the Ray Data shard is replaced, by the
same pairs in a list (tests/integration/test_training_paths.py compares the variants; Ray Train's own feed is
covered by the end-to-end tests).
"""

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from plad_ray.config import LossConfig

STEPS = 12
PAIRS_PER_STEP = 16  # per rank: micro 16 x accumulation 1, or micro 8 x accumulation 2

# name: TrainConfig overrides. test_training_paths.py compares each with "zero0" (the plain path) in
# fp32, where the paths must agree to rounding; bf16 paths against "bf16" (ZeRO-0 in bf16).
VARIANTS = {
    "zero0": dict(zero_stage=0),
    "zero1": dict(zero_stage=1),
    "zero2": dict(zero_stage=2),
    "zero3": dict(zero_stage=3),
    "accumulation": dict(zero_stage=0, micro_batch_size=8, gradient_accumulation_steps=2),
    "offload": dict(zero_stage=2, offload_optimizer=True),
    "max_steps": dict(zero_stage=0, max_steps=7),
    # Sequence packing: each micro-batch's 32 sequences in fewer rows, position ids restarting per sequence.
    "packing": dict(zero_stage=0, packing=True),
    "bf16": dict(zero_stage=0, precision="bf16"),
    # The LLaMA-2 config's combination: ZeRO-3 in bf16 with micro-batches accumulated.
    "zero3_accumulation_bf16": dict(zero_stage=3, precision="bf16", micro_batch_size=8, gradient_accumulation_steps=2),
    # GPU knobs: recomputed activations (the same ops again: the same losses), another attention kernel
    "gradient_checkpointing": dict(zero_stage=0, gradient_checkpointing=True),
    "eager_attention": dict(zero_stage=0, attn_implementation="eager"),
    # train.stream with a stream bringing more pairs than planned (PLAN below: 8 steps planned, 12 steps' worth of
    # pairs): training ends at the plan
    "stream_past_plan": dict(zero_stage=0),
    # token_kd: the frozen teacher loaded on the rank (worker._load_teacher), its token distributions the target
    "token_kd": dict(zero_stage=0, loss=LossConfig(type="token_kd", nll_weight=0.0)),
    # onpolicy_kd: the teacher's top-k on the samples, as the scoring stage writes them (TOPK below), through the feed's
    # collate and the worker's per-token term
    "onpolicy_kd": dict(zero_stage=0, loss=LossConfig(type="onpolicy_kd")),
    # A control that must fail the fp32 bounds: accumulation with the bug fixed in fd984da put back (every
    # micro-batch's loss its own mean, so a step trains a mean of micro-batch means).
    "accumulation_unweighted": dict(zero_stage=0, micro_batch_size=8, gradient_accumulation_steps=2),
}
PLAN = {"stream_past_plan": dict(stream=True, steps_per_epoch=8)}  # TrainPlan overrides (token_kd's teacher: main)
UNWEIGHTED = {"accumulation_unweighted"}  # run with worker.step_term_scales replaced by constant ones
TOPK = {"onpolicy_kd": 8}  # variants trained on pairs with the tiny teacher's top-k of each sample token (k)
HELDOUT = {"zero0", "zero3"}  # after training, also score held-out pairs shared out over the ranks and whole
HELDOUT_BATCHES, HELDOUT_BATCH = 5, 4  # 5 batches on 2 ranks: 3 and 2, so ZeRO-3 must match forwards


def synthetic_pairs(num: int, vocab: int, seed: int = 0) -> list[dict]:
    """Pairs of random token ids (prompt 3-8, chosen and rejected 2-10 tokens), a quarter identical."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num):
        prompt = rng.integers(5, vocab, rng.integers(3, 9))
        chosen = rng.integers(5, vocab, rng.integers(2, 11))
        identical = i % 4 == 0
        rejected = chosen.copy() if identical else rng.integers(5, vocab, rng.integers(2, 11))
        rows.append(
            {
                "id": f"p{i}",
                "prompt_ids": prompt,
                "chosen_ids": chosen,
                "rejected_ids": rejected,
                "status": "identical" if identical else "ranked",
            }
        )
    return rows


def with_teacher_topk(rows: list[dict], teacher_path: str, k: int) -> list[dict]:
    """Copies of `rows` with the teacher's top-k at each sample (rejected) token, flat, k per token, as the scoring
    stage writes them (rejected_topk_ids / _logps / _tokens): from the teacher's own forward over prompt + sample,
    position t's top-k being what the logits at t - 1 predict."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    out = []
    for row in rows:
        sequence = torch.tensor(np.concatenate([row["prompt_ids"], row["rejected_ids"]]))[None]
        with torch.no_grad():
            logps = torch.log_softmax(teacher(sequence).logits[0], -1)[len(row["prompt_ids"]) - 1 : -1]
        top = torch.topk(logps, k)
        out.append(
            {
                **row,
                "rejected_topk_ids": top.indices.flatten().numpy().astype(np.int32),
                "rejected_topk_logps": top.values.flatten().numpy().astype(np.float32),
                "rejected_topk_tokens": len(row["rejected_ids"]),
            }
        )
    return out


def ListStream(shard: "ListShard"):
    """train.stream's feed (plad_ray.train.stream_feed: steps joined over the ranks, one pass, no checkpoint) over
    a ListShard's rows, all of them training rows."""
    from plad_ray.train.stream_feed import StreamFeed

    class Stream(StreamFeed):
        def __init__(self):
            self.read_heldout = True

        def iter_batches(self, batch_size: int, batch_format: str = "numpy"):
            return shard.iter_batches(batch_size)

    return Stream()


class ListShard:
    """A rank's rows, handed out as Ray Data's iter_batches(batch_format="numpy") does; records the ids."""

    def __init__(self, rows: list[dict]):
        self.rows, self.consumed = rows, []

    def iter_batches(self, batch_size: int, batch_format: str = "numpy"):
        from plad_ray.train.batching import ragged

        for start in range(0, len(self.rows), batch_size):
            chunk = self.rows[start : start + batch_size]
            self.consumed += [r["id"] for r in chunk]
            topk = {"rejected_topk_ids", "rejected_topk_logps"} & set(chunk[0])
            yield {
                "id": np.asarray([r["id"] for r in chunk]),
                "status": np.asarray([r["status"] for r in chunk]),
                **{
                    k: ragged([r[k] for r in chunk])
                    for k in ("prompt_ids", "chosen_ids", "rejected_ids", *sorted(topk))
                },
                **({"rejected_topk_tokens": np.asarray([r["rejected_topk_tokens"] for r in chunk])} if topk else {}),
            }


def main(out: Path) -> None:
    import torch.distributed as dist

    from plad_ray.config import TrainConfig
    from plad_ray.models import tiny
    from plad_ray.tracking import Tracker
    from plad_ray.train import export, heldout, worker
    from plad_ray.train.batching import collate_pairs
    from plad_ray.train.feeds import FixedFeed
    from plad_ray.train.plan import TrainPlan

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model_path = tiny.materialize(tiny.PREFIX + "student", log=lambda _: None)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_path).vocab_size
    rows = synthetic_pairs(STEPS * PAIRS_PER_STEP * world, vocab)
    base = TrainConfig(
        num_workers=world,
        precision="fp32",
        learning_rate=1e-3,
        warmup_steps=2,
        length_grouping=1,
        micro_batch_size=PAIRS_PER_STEP,
        log_every_steps=1,
        eval_every_steps=0,
        trackers=[],
        max_length=64,
        loss=LossConfig(type="hinge", beta=1.0, nll_weight=1.0),
    )
    names = sys.argv[2:] or list(VARIANTS)
    if rank == 0:
        from transformers import AutoModelForCausalLM

        initial = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        torch.save({k: v.detach().clone() for k, v in initial.named_parameters()}, out / "initial.pt")
    results = {}
    for name in names:
        train = replace(base, **VARIANTS[name])
        plan = TrainPlan(
            train=train,
            model_path=model_path,
            export_uri=str(out / f"{name}-export"),
            tracking=None,
            pad_id=0,
            teacher_path=tiny.materialize(tiny.PREFIX + "teacher", log=lambda _: None) if name == "token_kd" else None,
            **{"steps_per_epoch": STEPS, **PLAN.get(name, {})},
        )
        torch.manual_seed(train.seed)
        engine = worker._initialize(plan, world)
        # the frozen models the objective reads, loaded as the workers load them: token_kd's teacher; None otherwise
        frozen = worker.Frozen(worker._load_teacher(plan, engine.device), worker._load_reference(plan, engine.device))
        if name in TOPK:
            teacher_path = tiny.materialize(tiny.PREFIX + "teacher", log=lambda _: None)
            shard = ListShard(with_teacher_topk(rows[rank::world], teacher_path, TOPK[name]))
        else:
            shard = ListShard(rows[rank::world])  # a fixed split: every variant sees the same pairs per rank
        progress = worker.Progress()
        weigh = worker.step_term_scales
        if name in UNWEIGHTED:
            worker.step_term_scales = lambda *args: (1.0, 1.0)
        try:
            feed = ListStream(shard) if plan.stream else FixedFeed(shard, list)
            worker._train(engine, feed, plan, progress, rank, Tracker(None), frozen, [])
        finally:
            worker.step_term_scales = weigh
        state = export.full_state_dict(engine.module, rank)
        consumed = [None] * world
        dist.all_gather_object(consumed, shard.consumed)
        figures = None
        if name in HELDOUT:
            eval_rows = synthetic_pairs(HELDOUT_BATCHES * HELDOUT_BATCH, vocab, seed=1)
            batches = [collate_pairs(b, 0) for b in ListShard(eval_rows).iter_batches(HELDOUT_BATCH)]
            shared = heldout.evaluate(engine, batches[rank::world], plan)  # as the workers score them
            figures = [None] * world
            dist.all_gather_object(figures, shared)
            figures = {"shared": figures, "whole": heldout.evaluate(engine, batches, plan, reduce=False)}
        if name.startswith("zero3"):
            export.export_hf(engine, plan, rank)
        if rank == 0:
            torch.save(state, out / f"{name}.pt")
            results[name] = {
                "losses": [e["loss"] for e in progress.curve],
                "nll": [e.get("nll") for e in progress.curve],
                "steps": progress.step,
                "engine_steps": engine.global_steps,
                "consumed": consumed,
                "heldout": figures,
                "padding": sum(e["padding"] for e in progress.curve) / len(progress.curve),
            }
        del engine
        dist.barrier()
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(Path(sys.argv[1]))
