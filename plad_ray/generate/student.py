"""The student step: k student samples per cached teacher output, written as pairs.

Resumes per (prompt id, sample index): a crashed run's pending pairs are kept and only the
missing keys are generated (a Ray Data anti-join of every (prompt, sample) against the keys on
disk: the keys never pass through the driver); prompts whose teacher outputs arrived after
pairs/ was committed extend it. Round r > 1 samples round r-1's trained student against the
same teacher outputs.
"""

import time

from plad_ray import pairs
from plad_ray.checks import Inputs
from plad_ray.config import Config
from plad_ray.data import parquet, storage
from plad_ray.errors import DataError
from plad_ray.generate import engines
from plad_ray.generate.stages import samples_to_generate, student_pairs
from plad_ray.models.folders import eos_token_ids, shares_vocabulary


def generate_pairs(cfg: Config, inputs: Inputs, log=print, round: int = 1) -> dict:
    """k student samples per cached teacher output -> pairs; resumes a crashed run per (prompt, sample).

    Round r > 1 samples from round r-1's trained student; the teacher outputs are reused.
    """
    layout = cfg.layout()
    uri = layout.pairs(round)
    student_path = inputs.student_for_round(cfg, round)
    existing = storage.manifest(uri)
    teacher_rows = storage.manifest(layout.teacher())
    if teacher_rows is None:
        raise DataError(f"teacher cache {layout.teacher()}: missing; generate teacher outputs first")
    expected = teacher_rows["rows"] * cfg.student.num_samples
    if existing is not None and existing["rows"] >= expected:
        log(f"[generate] pairs: {existing['rows']} pairs already complete at {uri}")
        return {"pairs": existing["rows"]}
    # Not there yet: a crashed run's pending files, or prompts appended to the source since pairs/ was
    # committed (their teacher outputs are new): only the missing (prompt, sample) keys are generated.
    done_ds = parquet.done_keys_dataset(uri, ["id", "sample_index"], log)  # read by Ray tasks, not here
    done = 0 if done_ds is None else done_ds.count()  # counted by Ray Data
    todo = expected - done
    if existing is not None:
        log(f"[generate] pairs: {existing['rows']} pairs complete at {uri}; the teacher cache has "
            f"{teacher_rows['rows'] - existing['rows'] // cfg.student.num_samples} more prompts: adding {todo} pairs")
    log(f"[generate] round {round} student: {teacher_rows['rows']} prompts x {cfg.student.num_samples} samples with "
        f"{cfg.student.model if round == 1 else student_path} (0 teacher tokens: teacher outputs from the cache)"
        + (f"; {done} pairs already written by an earlier run" if done else ""))
    start = time.perf_counter()
    earlier = parquet.uncommitted_files(uri)
    if todo:
        # The teacher's own ids are scored as they are when they mean the same tokens to the student.
        shared = inputs.teacher_path is not None and shares_vocabulary(inputs.teacher_path, student_path,
                                                                      cfg.student.trust_remote_code)
        samples = samples_to_generate(parquet.read(layout.teacher()), cfg.student.num_samples, done_ds,
                                      num_partitions=1 + done // parquet.JOIN_ROWS_PER_PARTITION)
        samples = engines.split_for_replicas(samples, todo, cfg.student.batch_size, cfg.student.replicas)
        with engines.engine_deaths("student", cfg.student):
            parquet.write_pending(
                student_pairs(samples, cfg.student, student_path,
                              cfg.student.model if round == 1 else f"{cfg.student.model} after round {round - 1}",
                              eos_token_ids(student_path), cfg.cluster.use_gpu, cfg.data.heldout_fraction,
                              shared_vocabulary=shared),
                uri, pairs.PAIR_SCHEMA, parquet.rows_per_file(todo, cfg.student.batch_size))
    tokens = parquet.pending_sum(uri, "rejected_num_tokens", earlier)
    rows = parquet.commit(uri, {"student_model": cfg.student.model}, ["id", "sample_index"], log)
    seconds = time.perf_counter() - start
    if existing is not None:
        log(f"[generate] pairs: added {rows - existing['rows']} pairs to the {existing['rows']} already committed")
    log(f"[generate] pairs: {rows} pairs ({todo} generated now, {tokens} student tokens) in {seconds:.1f}s "
        f"({todo / seconds:.1f} samples/s, {tokens / seconds:.0f} tokens/s incl. start-up) -> {uri}")
    return {"pairs": rows, "pairs_generated": todo, "student_tokens": tokens, "student_seconds": seconds}
