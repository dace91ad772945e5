"""The student step: k student samples per cached teacher output, written as pairs.

Resumes per (prompt id, sample index): a crashed run's pending pairs are kept and only the
missing keys are generated (a Ray Data anti-join of every (prompt, sample) against the keys on
disk: the keys never pass through the driver); prompts whose teacher outputs arrived after
pairs/ was committed extend it. Round r > 1 samples round r-1's trained student against the
same teacher outputs.
"""

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from plad_ray import pairs
from plad_ray.checks import Inputs
from plad_ray.config import StudentEngineConfig
from plad_ray.data import parquet, storage
from plad_ray.generate import engines, schemas
from plad_ray.generate.stages import samples_to_generate, student_pairs
from plad_ray.models.folders import eos_token_ids, shares_vocabulary
from plad_ray.run_context import RunContext

HELDOUT_LAST = "training_pair"  # the sort key that puts the held-out prompts' samples first (train.stream)


def generate_pairs(student: StudentEngineConfig, run: RunContext, inputs: Inputs, log=print, round: int = 1) -> dict:
    """k student samples per cached teacher output -> pairs (the held-out prompts' marked: run.heldout_fraction);
    resumes a crashed run per (prompt, sample).

    Round r > 1 samples from round r-1's trained student; the teacher outputs are reused.
    """
    layout = run.layout
    uri = layout.pairs(round)
    student_path = inputs.student_for_round(run, round)
    existing = storage.manifest(uri)
    teacher_rows = layout.teacher_made()
    expected = teacher_rows["rows"] * student.num_samples
    if existing is not None and existing["rows"] >= expected:
        log(f"[generate] pairs: {existing['rows']} pairs already complete at {uri}")
        return {"pairs": existing["rows"]}
    # Not there yet: a crashed run's pending files, or prompts appended to the source since pairs/ was
    # committed (their teacher outputs are new): only the missing (prompt, sample) keys are generated.
    done_ds = parquet.done_keys_dataset(uri, ["id", "sample_index"], log)  # read by Ray tasks, not here
    done = 0 if done_ds is None else done_ds.count()  # counted by Ray Data
    todo = expected - done
    if existing is not None:
        log(
            f"[generate] pairs: {existing['rows']} pairs complete at {uri}; the teacher cache has "
            f"{teacher_rows['rows'] - existing['rows'] // student.num_samples} more prompts: adding {todo} pairs"
        )
    log(
        f"[generate] round {round} student: {teacher_rows['rows']} prompts x {student.num_samples} samples with "
        f"{student.model if round == 1 else student_path} (0 teacher tokens: teacher outputs from the cache)"
        + (f"; {done} pairs already written by an earlier run" if done else "")
    )
    start = time.perf_counter()
    earlier = parquet.uncommitted_files(uri)
    if todo:
        with engines.engine_deaths("student", student):
            parquet.write_pending(
                _pairs(student, run, inputs, round, done_ds, done, todo),
                uri,
                schemas.PAIR_SCHEMA,
                parquet.rows_per_file(todo, student.batch_size),
            )
    return _commit(student, uri, existing, todo, earlier, start, log)


def _pairs(
    student: StudentEngineConfig,
    run: RunContext,
    inputs: Inputs,
    round: int,
    done_ds,
    done: int,
    todo: int,
    stream_seed: int | None = None,
):
    """The Ray Dataset of the round's pairs still to generate (rows of schemas.PAIR_SCHEMA); with `stream_seed`
    (train.seed), the held-out prompts' samples go through the engines first, the others in that seed's training
    order (train.stream reads them so)."""
    layout = run.layout
    student_path = inputs.student_for_round(run, round)
    # The teacher's own ids are scored as they are when they mean the same tokens to the student.
    shared = inputs.teacher_path is not None and shares_vocabulary(
        inputs.teacher_path, student_path, student.trust_remote_code
    )
    parquet.require_columns(layout.teacher(), schemas.TEACHER_READ_BY_STUDENT, "teacher outputs")
    samples = samples_to_generate(
        parquet.read(layout.teacher()),
        student.num_samples,
        done_ds,
        num_partitions=1 + done // parquet.JOIN_ROWS_PER_PARTITION,
    )
    if stream_seed is not None:
        # The held-out prompts' samples first, then the rest in train.seed's shuffle (the order the sequential
        # trainer uses, pairs.with_training_order): a sort keeps its order through the stream (Ray Data's
        # preserve_order), a union does not. It waits for the samples to be listed, not for any engine.
        samples = samples.map_batches(
            _stream_order,
            fn_kwargs={"fraction": run.heldout_fraction, "seed": stream_seed},
            batch_format="numpy",
        )
        samples = samples.sort([HELDOUT_LAST, "order"])
    samples = engines.split_for_replicas(samples, todo, student.batch_size, student.replicas)
    return student_pairs(
        samples,
        student,
        student_path,
        student.model if round == 1 else f"{student.model} after round {round - 1}",
        eos_token_ids(student_path),
        run.use_gpu,
        run.heldout_fraction,
        shared_vocabulary=shared,
    )


@dataclass
class PairStream:
    """train.stream: the student engines' pairs as a Ray Dataset, and what the trainer plans with."""

    ds: Any  # rows of schemas.PAIR_SCHEMA, the held-out prompts' first, each block written to pairs/ as it passes
    train_pairs: int  # pairs expected for training (the stream may bring fewer: too long, identical)
    heldout_pairs: int
    block_rows: int  # rows per block as the engines make them (the ranks take blocks; small blocks, even ranks)


def _stream_order(batch: dict, fraction: float, seed: int) -> dict:
    later = np.asarray([not pairs.is_heldout(i, fraction) for i in batch["id"]])
    return {**pairs.with_training_order(batch, seed), HELDOUT_LAST: later}


def pair_stream(
    student: StudentEngineConfig,
    run: RunContext,
    inputs: Inputs,
    seed: int,
    log=print,
    round: int = 1,
) -> PairStream | None:
    """train.stream: the round's pairs as a stream that writes each block to pairs/'s pending files as it
    passes (`parquet.WritePending`), the held-out prompts' pairs first, then the others in train.seed's (`seed`)
    order; None when pairs/ already holds some (a re-run: `generate_pairs` completes them and training reads
    them from disk). `commit_pairs` commits what the stream wrote."""
    layout = run.layout
    uri = layout.pairs(round)
    if storage.manifest(uri) is not None:
        return None  # committed: generate_pairs says whether any are missing
    written = parquet.written_files(uri, log=lambda _: None)
    if written:
        log(
            f"[generate] round {round}: {uri} already holds pairs ({len(written)} files) from an earlier run; "
            "train.stream does not stream this round again: the missing pairs are generated first, then "
            "training reads them from disk"
        )
        return None
    teacher_rows = layout.teacher_made()
    fraction, k = run.heldout_fraction, student.num_samples
    heldout = (
        parquet.read(layout.teacher())
        .select_columns(["id"])
        .filter(lambda row: pairs.is_heldout(row["id"], fraction))
        .count()
    )
    todo = teacher_rows["rows"] * k
    log(
        f"[generate] round {round} student, streaming into training: {todo // k} prompts x {k} samples with "
        f"{student.model if round == 1 else inputs.student_for_round(run, round)}, the {heldout} held-out "
        f"prompts' pairs first; every pair is written to {uri} before a trainer reads it"
    )
    # Files of parquet.rows_per_file rows (Ray Data bundles the engines' blocks up to it), as a sequential round
    # writes them: a 200M-pair stream makes ~12k files, not one per engine block (~390k at batch 512).
    stream = _pairs(student, run, inputs, round, None, 0, todo, stream_seed=seed).map_batches(
        parquet.WritePending,
        fn_constructor_kwargs=dict(uri=uri, schema=schemas.PAIR_SCHEMA, keys=["id", "sample_index"]),
        batch_size=parquet.rows_per_file(todo, student.batch_size),
        batch_format="pyarrow",
        concurrency=1,
        num_cpus=0,
    )  # I/O: holds no CPU
    return PairStream(stream, train_pairs=todo - heldout * k, heldout_pairs=heldout * k, block_rows=student.batch_size)


def commit_pairs(student: StudentEngineConfig, run: RunContext, round: int, start: float, log=print) -> dict:
    """Commit the pairs a stream wrote (`pair_stream`); their figures, as `generate_pairs` reports them."""
    return _commit(student, run.layout.pairs(round), None, None, [], start, log)


def _commit(
    student: StudentEngineConfig,
    uri: str,
    existing: dict | None,
    todo: int | None,
    earlier: list[str],
    start: float,
    log,
) -> dict:
    tokens = parquet.pending_sum(uri, "rejected_num_tokens", earlier)
    rows = parquet.commit(uri, {"student_model": student.model}, ["id", "sample_index"], log)
    seconds = time.perf_counter() - start
    todo = rows - (existing or {"rows": 0})["rows"] if todo is None else todo
    if existing is not None:
        log(f"[generate] pairs: added {rows - existing['rows']} pairs to the {existing['rows']} already committed")
    log(
        f"[generate] pairs: {rows} pairs ({todo} generated now, {tokens} student tokens) in {seconds:.1f}s "
        f"({todo / seconds:.1f} samples/s, {tokens / seconds:.0f} tokens/s incl. start-up) -> {uri}"
    )
    return {"pairs": rows, "pairs_generated": todo, "student_tokens": tokens, "student_seconds": seconds}
