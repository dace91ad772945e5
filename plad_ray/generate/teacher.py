"""The teacher step: teacher outputs for every prompt id not yet in the cache.

The cache (output_dir/teacher/) is keyed by prompt id and holds the prompt text beside each
output (plad_ray.checks refuses a cache whose prompts changed under their ids). A crashed run's
pending files count as done; new ids (prompts appended to the source) are generated; the commit
lists every file once (plad_ray.data.parquet).
"""

import contextlib
import time

import pyarrow.compute as pc

from plad_ray import pairs
from plad_ray.checks import Inputs
from plad_ray.config import Config
from plad_ray.data import parquet
from plad_ray.generate import engines
from plad_ray.generate.stages import teacher_outputs, teacher_outputs_http
from plad_ray.models.folders import eos_token_ids


def generate_teacher(cfg: Config, inputs: Inputs, log=print) -> dict:
    """Teacher outputs for every prompt id not yet cached (committed or left pending by a crash)."""
    import ray.data

    uri = cfg.layout().teacher()
    done = parquet.done_keys(uri, ["id"], log).column("id")
    missing = inputs.prompts.filter(pc.invert(pc.is_in(inputs.prompts.column("id"), value_set=done)))
    stats = {"teacher_cached": len(done), "teacher_generated": missing.num_rows}
    if missing.num_rows == 0:
        log(f"[generate] teacher: all {len(done)} outputs already cached at {uri}; 0 teacher requests")
    else:
        log(f"[generate] teacher: {missing.num_rows} prompts to generate ({len(done)} cached) with {cfg.teacher.model}")
        start = time.perf_counter()
        earlier = parquet.uncommitted_files(uri)  # a crashed run's outputs: not this run's tokens
        teacher = cfg.teacher
        workers = teacher.endpoint.concurrency if teacher.endpoint else teacher.replicas
        ds = engines.split_for_replicas(ray.data.from_arrow(missing), missing.num_rows, teacher.batch_size, workers)
        if teacher.endpoint is not None:
            outputs, deaths = teacher_outputs_http(ds, teacher), contextlib.nullcontext()
        else:
            outputs = teacher_outputs(ds, teacher, inputs.teacher_path, teacher.model,
                                      eos_token_ids(inputs.teacher_path), cfg.cluster.use_gpu)
            deaths = engines.engine_deaths("teacher", teacher)
        with deaths:
            parquet.write_pending(outputs, uri, pairs.TEACHER_SCHEMA)
        seconds = time.perf_counter() - start
        tokens = parquet.pending_sum(uri, "teacher_num_tokens", earlier)
        stats.update(teacher_seconds=seconds, teacher_tokens=tokens)
        log(f"[generate] teacher: {missing.num_rows} outputs, {tokens} tokens in {seconds:.1f}s "
            f"({missing.num_rows / seconds:.1f} prompts/s, {tokens / seconds:.0f} tokens/s incl. start-up) -> {uri}")
    parquet.commit(uri, {"teacher_model": cfg.teacher.model}, ["id"], log)
    return stats
