"""The teacher step: teacher outputs for every prompt id not yet in the cache.

The cache (output_dir/teacher/) is keyed by prompt id and holds the prompt text beside each
output (plad_ray.checks refuses a cache whose prompts changed under their ids). A crashed run's
pending files count as done; new ids (prompts appended to the source) are generated: the checked
prompts less the cached ids, by a Ray Data anti-join; the commit lists every file once
(plad_ray.data.parquet).
"""

import contextlib
import time

from plad_ray import pairs
from plad_ray.checks import Inputs
from plad_ray.config import Config
from plad_ray.data import parquet
from plad_ray.generate import engines
from plad_ray.generate.stages import teacher_outputs, teacher_outputs_http
from plad_ray.models.folders import eos_token_ids


def generate_teacher(cfg: Config, inputs: Inputs, log=print) -> dict:
    """Teacher outputs for every prompt id not yet cached (committed or left pending by a crash)."""
    uri = cfg.layout().teacher()
    done_ds = parquet.done_keys_dataset(uri, ["id"], log)  # read by Ray tasks, not here
    done = 0 if done_ds is None else done_ds.count()
    missing = inputs.prompts.select_columns(["id", "prompt"])
    if done_ds is not None:  # an anti-join on id: the cached ids never pass through the driver
        missing = missing.join(done_ds, "left_anti", num_partitions=1 + done // parquet.JOIN_ROWS_PER_PARTITION, on=("id",))
    missing = missing.materialize()
    todo = missing.count()
    stats = {"teacher_cached": done, "teacher_generated": todo}
    if todo == 0:
        log(f"[generate] teacher: all {done} outputs already cached at {uri}; 0 teacher requests")
    else:
        log(f"[generate] teacher: {todo} prompts to generate ({done} cached) with {cfg.teacher.model}")
        start = time.perf_counter()
        earlier = parquet.uncommitted_files(uri)  # a crashed run's outputs: not this run's tokens
        teacher = cfg.teacher
        workers = teacher.endpoint.concurrency if teacher.endpoint else teacher.replicas
        ds = engines.split_for_replicas(missing, todo, teacher.batch_size, workers)
        if teacher.endpoint is not None:
            outputs, deaths = teacher_outputs_http(ds, teacher), contextlib.nullcontext()
        else:
            outputs = teacher_outputs(ds, teacher, inputs.teacher_path, teacher.model,
                                      eos_token_ids(inputs.teacher_path), cfg.cluster.use_gpu)
            deaths = engines.engine_deaths("teacher", teacher)
        with deaths:
            parquet.write_pending(outputs, uri, pairs.TEACHER_SCHEMA, parquet.rows_per_file(todo, teacher.batch_size))
        seconds = time.perf_counter() - start
        tokens = parquet.pending_sum(uri, "teacher_num_tokens", earlier)
        stats.update(teacher_seconds=seconds, teacher_tokens=tokens)
        log(f"[generate] teacher: {todo} outputs, {tokens} tokens in {seconds:.1f}s "
            f"({todo / seconds:.1f} prompts/s, {tokens / seconds:.0f} tokens/s incl. start-up) -> {uri}")
    parquet.commit(uri, {"teacher_model": cfg.teacher.model}, ["id"], log)
    return stats
