"""The teacher step: teacher outputs for every prompt id not yet in the cache.

The cache (output_dir/teacher/) is keyed by prompt id and holds the prompt text beside each
output (plad_ray.checks refuses a cache whose prompts changed under their ids). A crashed run's
pending files count as done; new ids (prompts appended to the source) are generated: the checked
prompts less the cached ids, by a Ray Data anti-join; the commit lists every file once
(plad_ray.data.parquet). A black-box teacher's set-aside prompts become final only when this step
ends normally (plad_ray.generate.set_aside).
"""

import time

from plad_ray.checks import Inputs
from plad_ray.config import TeacherEngineConfig
from plad_ray.data import parquet
from plad_ray.generate import engines, schemas, set_aside
from plad_ray.generate.endpoint_stats import write_from_endpoint
from plad_ray.generate.stages import teacher_outputs, teacher_outputs_http
from plad_ray.models.folders import eos_token_ids
from plad_ray.run_context import RunContext


def generate_teacher(teacher: TeacherEngineConfig, run: RunContext, inputs: Inputs, log=print) -> dict:
    """Teacher outputs for every prompt id not yet cached (committed or left pending by a crash)."""
    uri = run.layout.teacher()
    done_ds = parquet.done_keys_dataset(uri, ["id"], log)  # read by Ray tasks, not here
    done = 0 if done_ds is None else done_ds.count()
    missing = inputs.prompts.select_columns(["id", "prompt"])
    if done_ds is not None:  # an anti-join on id: the cached ids never pass through the driver
        missing = missing.join(
            done_ds, "left_anti", num_partitions=1 + done // parquet.JOIN_ROWS_PER_PARTITION, on=("id",)
        )
    refused = _set_aside_earlier(teacher, run, log)
    if refused:
        missing = missing.filter(lambda row: row["id"] not in refused)
    missing = missing.materialize()
    todo = missing.count()
    stats = {"teacher_cached": done, "teacher_generated": todo}
    if todo == 0:
        log(f"[generate] teacher: all {done} outputs already cached at {uri}; 0 teacher requests")
    else:
        log(f"[generate] teacher: {todo} prompts to generate ({done} cached) with {teacher.model}")
        start = time.perf_counter()
        earlier = parquet.uncommitted_files(uri)  # a crashed run's outputs: not this run's tokens
        workers = teacher.endpoint.concurrency if teacher.endpoint else teacher.replicas
        ds = engines.split_for_replicas(missing, todo, teacher.batch_size, workers)
        rows_per_file = parquet.rows_per_file(todo, teacher.batch_size)
        if teacher.endpoint is not None:
            refused_uri = run.layout.teacher_refused()
            try:
                endpoint = write_from_endpoint(
                    lambda stats: teacher_outputs_http(ds, teacher, refused_uri, stats),
                    uri,
                    schemas.TEACHER_SCHEMA,
                    rows_per_file,
                    f"{done + todo} teacher outputs",
                )
            except BaseException:
                set_aside.discard(refused_uri)  # this run's verdicts are not final: a re-run asks those prompts again
                raise
            set_aside.promote(refused_uri)
            stats["teacher_endpoint"] = endpoint
        else:
            outputs = teacher_outputs(
                ds, teacher, inputs.teacher_path, teacher.model, eos_token_ids(inputs.teacher_path), run.use_gpu
            )
            with engines.engine_deaths("teacher", teacher):
                parquet.write_pending(outputs, uri, schemas.TEACHER_SCHEMA, rows_per_file)
        # this run's outputs (an endpoint's: the server's count for each; its usage also holds the canaries')
        tokens = parquet.pending_sum(uri, "teacher_num_tokens", earlier)
        seconds = time.perf_counter() - start
        aside = stats.get("teacher_endpoint", {})
        written = todo - aside.get("refused", 0) - aside.get("failed", 0)
        stats.update(teacher_generated=written, teacher_seconds=seconds, teacher_tokens=tokens)
        log(
            f"[generate] teacher: {written} outputs, {tokens} tokens in {seconds:.1f}s "
            f"({written / seconds:.1f} prompts/s, {tokens / seconds:.0f} tokens/s incl. start-up) -> {uri}"
        )
        if "teacher_endpoint" in stats:
            log(_endpoint_line(stats["teacher_endpoint"], run.layout.teacher_refused()))
    parquet.commit(uri, {"teacher_model": teacher.model}, ["id"], log)
    return stats


def _set_aside_earlier(teacher: TeacherEngineConfig, run: RunContext, log) -> set:
    """Prompt ids a black-box teacher refused, or kept failing on, in an earlier run of this output_dir that ended
    normally: not asked again. Verdicts an unfinished run left pending are dropped: those prompts are asked again."""
    if teacher.endpoint is None:
        return set()
    uri = run.layout.teacher_refused()
    unfinished = set_aside.discard(uri)
    if unfinished:
        log(
            f"[generate] teacher: {unfinished} prompts an unfinished run set aside are asked again (its verdicts "
            f"were pending in {set_aside.pending_uri(uri)})"
        )
    records = set_aside.read(uri)
    failed = sum(r["kind"] == set_aside.FAILED for r in records.values())
    if records:
        what = [f"{len(records) - failed} prompts the endpoint refused earlier"] if len(records) > failed else []
        what += [f"{failed} prompts whose requests kept failing while it answered others"] if failed else []
        log(
            f"[generate] teacher: {' and '.join(what)} are not asked again (reasons in {uri}; delete that folder "
            "to ask again)"
        )
    return set(records)


def _endpoint_line(figures: dict, refused_uri: str) -> str:
    """What the endpoint did in this run: down (no request answered) for how long, and which prompts it did not
    answer although it answered the others."""
    line = (
        f"[generate] teacher endpoint: {figures['requests']} requests ({figures['canaries']} canaries), "
        f"{figures['retries']} retries, {figures['throttled']} throttled ({figures['throttle_wait_s']:.1f} s "
        f"waited), {figures['outage_s']:.1f} s down (no request answered); usage {figures['prompt_tokens']} "
        f"prompt + {figures['completion_tokens']} completion tokens"
    )
    if figures["failed"]:
        line += (
            f"; {figures['failed']} prompts failed while the endpoint answered the others, set aside with "
            f"their last error in {refused_uri}"
        )
    if figures["refused"]:
        line += f"; {figures['refused']} prompts refused, set aside in {refused_uri}"
    return line
