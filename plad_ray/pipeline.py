"""The one place that wires the stages together.

    prompts --teacher vLLM--> teacher/ --student vLLM--> pairs/ --DeepSpeed--> student/ --vLLM--> eval/
                                  |  (rounds r > 1: round r-1's student samples again) |
                                  +--> round-<r>/pairs/ --DeepSpeed--> round-<r>/student/ ...

Inputs are checked before Ray starts. Each stage reuses a complete output of the same
run (same config) in output_dir, so a re-run after a crash continues where it stopped:
teacher outputs are generated only for prompt ids not yet in the cache, pairs are
kept once complete, and training resumes from its last checkpoint.
"""

import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from plad_ray import pairs
from plad_ray.config import Config
from plad_ray.data import parquet, storage
from plad_ray.data.prompts import check_cached_prompts, read_prompts
from plad_ray.generate import engines
from plad_ray.errors import ConfigError, DataError
from plad_ray.limits import apply_length_policy, prompt_limits
from plad_ray.models import eos_token_ids, resolve_model, shares_vocabulary
from plad_ray.outputs import prepare_output
from plad_ray.report import write_summary

@dataclass
class Inputs:
    """Checked inputs; each field only when the stages run need it."""

    prompts: pa.Table | None = None
    quarantined: list = field(default_factory=list)  # prompt rows set aside, with their reasons
    truncated: int = 0  # prompts cut to fit (data.too_long=truncate)
    teacher_path: str | None = None
    student_path: str | None = None


def prepare(cfg: Config, generation: bool, training: bool, overwrite: bool = False, check_only: bool = False,
            log=print) -> Inputs | None:
    """Everything before the expensive work: inputs, resources, output folder, then Ray.

    With check_only (`--check`), stop before writing anything or starting Ray; None.
    """
    from plad_ray import cluster

    token_kd = training and cfg.train.loss.type == "token_kd"
    inputs = check_inputs(cfg, prompts=generation, teacher=generation or token_kd, pairs_written=not generation,
                          log=log)
    cluster.check_local(cfg, generation, training)
    prepare_output(cfg, overwrite, dry_run=check_only, log=log)
    # Cached teacher outputs still answer their ids' prompts (skipped where --overwrite would first remove a stale
    # cache; --check reads only committed files, as reading pending ones deletes those cut off mid-write).
    if generation and not (check_only and overwrite):
        uri, keys = cfg.teacher_cache_uri(), ["id", "prompt"]
        cached = parquet.read_table(uri, keys) if check_only else parquet.done_keys(uri, keys, log)
        if cached is not None:
            check_cached_prompts(cached, inputs.prompts, cfg.data.prompts, uri)
    if check_only:
        log("[plad-ray] --check: config, inputs, models, resources and output_dir are fine; nothing was started")
        return None
    if inputs.quarantined:
        storage.write_text(cfg.quarantine_uri(), "".join(json.dumps(q) + "\n" for q in inputs.quarantined))
        log(f"[plad-ray] {len(inputs.quarantined)} prompt rows quarantined with their reasons -> {cfg.quarantine_uri()}")
    cluster.start(cfg, generation, training, log=log)
    return inputs


def check_inputs(cfg: Config, prompts: bool = True, teacher: bool = True, student: bool = True,
                 pairs_written: bool = False, log=print) -> Inputs:
    """Read prompts, resolve model folders, find earlier outputs; raises before any expensive work."""
    if pairs_written and cfg.train.pairs is not None:
        check_external_pairs(cfg.train.pairs)
    elif pairs_written and storage.manifest(cfg.pairs_uri()) is None:
        raise DataError(f"pairs {cfg.pairs_uri()}: missing or incomplete; run jobs.generate_pairs first, "
                        "or point train.pairs at a pairs dataset")
    inputs = Inputs()
    if teacher and cfg.teacher.endpoint is not None:
        from plad_ray.generate.endpoint import check_endpoint

        check_endpoint(cfg.teacher.endpoint, cfg.teacher.model)
        log(f"[plad-ray] teacher: {cfg.teacher.model} at {cfg.teacher.endpoint.url}")
    elif teacher:
        inputs.teacher_path = resolve_model(cfg.teacher.model, "teacher.model", cfg.teacher.allow_pickle_weights,
                                            cfg.teacher.chat_template, log=log)
    if student:
        inputs.student_path = resolve_model(cfg.student.model, "student.model", cfg.student.allow_pickle_weights,
                                            cfg.student.chat_template, log=log)
    if cfg.train.loss.type == "token_kd" and inputs.teacher_path and inputs.student_path:
        check_shared_vocabulary(inputs.teacher_path, inputs.student_path, cfg.student.trust_remote_code)
    if cfg.teacher.sampling.stop is not None and cfg.student.sampling.stop != cfg.teacher.sampling.stop:
        log(f"[plad-ray] warning: the teacher stops at {cfg.teacher.sampling.stop!r} but the student at "
            f"{cfg.student.sampling.stop!r}: the student is trained to end its answers with {cfg.teacher.sampling.stop!r}, "
            "which will not end its own generations; give student.sampling.stop the same string")
    if prompts:
        source = read_prompts(cfg.data.prompts, cfg.data.max_prompts, cfg.data.bad_rows)
        limits = prompt_limits(cfg, inputs.teacher_path, inputs.student_path)
        inputs.prompts, too_long, inputs.truncated = apply_length_policy(
            source.table, limits, cfg.data.too_long, cfg.data.prompts)
        inputs.quarantined = source.quarantined + too_long
        if inputs.prompts.num_rows == 0:
            raise DataError(f"prompt source {cfg.data.prompts}: no prompt is usable ({len(inputs.quarantined)} set "
                            f"aside, first: {inputs.quarantined[0]['reason']})")
        log(f"[plad-ray] {inputs.prompts.num_rows} prompts from {cfg.data.prompts}"
            + (f"; {len(inputs.quarantined)} set aside" if inputs.quarantined else "")
            + (f"; {inputs.truncated} truncated to fit" if inputs.truncated else ""))
    return inputs


def generate_teacher(cfg: Config, inputs: Inputs, log=print) -> dict:
    """Teacher outputs for every prompt id not yet cached (committed or left pending by a crash)."""
    import ray.data

    from plad_ray.generate.stages import teacher_outputs, teacher_outputs_http

    uri = cfg.teacher_cache_uri()
    done = parquet.done_keys(uri, ["id"], log).column("id")
    missing = inputs.prompts.filter(pc.invert(pc.is_in(inputs.prompts.column("id"), value_set=done)))
    stats = {"teacher_cached": len(done), "teacher_generated": missing.num_rows}
    if missing.num_rows == 0:
        log(f"[generate] teacher: all {len(done)} outputs already cached at {uri}; 0 teacher requests")
    else:
        log(f"[generate] teacher: {missing.num_rows} prompts to generate ({len(done)} cached) with {cfg.teacher.model}")
        start = time.perf_counter()
        earlier = parquet.uncommitted_files(uri)  # a crashed run's outputs: not this run's tokens
        t = cfg.teacher
        workers = t.endpoint.concurrency if t.endpoint else t.replicas
        ds = engines.spread(ray.data.from_arrow(missing), missing.num_rows, t.batch_size, workers)
        if t.endpoint is not None:
            outputs, deaths = teacher_outputs_http(ds, t), contextlib.nullcontext()
        else:
            outputs = teacher_outputs(ds, t, inputs.teacher_path, t.model, eos_token_ids(inputs.teacher_path),
                                      cfg.cluster.use_gpu)
            deaths = engines.engine_deaths("teacher", t)
        with deaths:
            parquet.write_pending(outputs, uri, pairs.TEACHER_SCHEMA)
        seconds = time.perf_counter() - start
        tokens = parquet.pending_sum(uri, "teacher_num_tokens", earlier)
        stats.update(teacher_seconds=seconds, teacher_tokens=tokens)
        log(f"[generate] teacher: {missing.num_rows} outputs, {tokens} tokens in {seconds:.1f}s "
            f"({missing.num_rows / seconds:.1f} prompts/s, {tokens / seconds:.0f} tokens/s incl. start-up) -> {uri}")
    parquet.commit(uri, {"teacher_model": cfg.teacher.model}, ["id"], log)
    return stats


def generate_pairs(cfg: Config, inputs: Inputs, log=print, round: int = 1) -> dict:
    """k student samples per cached teacher output -> pairs; resumes a crashed run per (prompt, sample).

    Round r > 1 samples from round r-1's trained student; the teacher outputs are reused.
    """
    from plad_ray.generate.stages import student_pairs

    uri = cfg.pairs_uri(round)
    student_path = inputs.student_path if round == 1 else storage.local_path(cfg.student_export_uri(round - 1))
    existing = storage.manifest(uri)
    teacher_rows = storage.manifest(cfg.teacher_cache_uri())
    if teacher_rows is None:
        raise DataError(f"teacher cache {cfg.teacher_cache_uri()}: missing; generate teacher outputs first")
    expected = teacher_rows["rows"] * cfg.student.num_samples
    if existing is not None and existing["rows"] >= expected:
        log(f"[generate] pairs: {existing['rows']} pairs already complete at {uri}")
        return {"pairs": existing["rows"]}
    # Not there yet: a crashed run's pending files, or prompts appended to the source since pairs/ was
    # committed (their teacher outputs are new): only the missing (prompt, sample) keys are generated.
    done_table = parquet.done_keys(uri, ["id", "sample_index"], log)
    done = set(zip(done_table.column("id").to_pylist(), done_table.column("sample_index").to_pylist()))
    todo = expected - len(done)
    if existing is not None:
        log(f"[generate] pairs: {existing['rows']} pairs complete at {uri}; the teacher cache has "
            f"{teacher_rows['rows'] - existing['rows'] // cfg.student.num_samples} more prompts: adding {todo} pairs")
    log(f"[generate] round {round} student: {teacher_rows['rows']} prompts x {cfg.student.num_samples} samples with "
        f"{cfg.student.model if round == 1 else student_path} (0 teacher tokens: teacher outputs from the cache)"
        + (f"; {len(done)} pairs already written by an earlier run" if done else ""))
    start = time.perf_counter()
    earlier = parquet.uncommitted_files(uri)
    if todo:
        # The teacher's own ids are scored as they are when they mean the same tokens to the student.
        shared = inputs.teacher_path is not None and shares_vocabulary(inputs.teacher_path, student_path,
                                                                      cfg.student.trust_remote_code)
        teacher_ds = parquet.read(cfg.teacher_cache_uri())
        teacher_ds = engines.spread(teacher_ds, teacher_rows["rows"], cfg.student.batch_size, cfg.student.replicas)
        with engines.engine_deaths("student", cfg.student):
            parquet.write_pending(
                student_pairs(teacher_ds, cfg.student, student_path,
                              cfg.student.model if round == 1 else f"{cfg.student.model} after round {round - 1}",
                              eos_token_ids(student_path), cfg.cluster.use_gpu, cfg.data.heldout_fraction,
                              skip=done, shared_vocabulary=shared),
                uri, pairs.PAIR_SCHEMA)
    tokens = parquet.pending_sum(uri, "rejected_num_tokens", earlier)
    rows = parquet.commit(uri, {"student_model": cfg.student.model}, ["id", "sample_index"], log)
    seconds = time.perf_counter() - start
    if existing is not None:
        log(f"[generate] pairs: added {rows - existing['rows']} pairs to the {existing['rows']} already committed")
    log(f"[generate] pairs: {rows} pairs ({todo} generated now, {tokens} student tokens) in {seconds:.1f}s "
        f"({todo / seconds:.1f} samples/s, {tokens / seconds:.0f} tokens/s incl. start-up) -> {uri}")
    return {"pairs": rows, "pairs_generated": todo, "student_tokens": tokens, "student_seconds": seconds}


def check_external_pairs(uri: str) -> None:
    """train.pairs: a Parquet file or folder with TRL's string columns prompt, chosen, rejected."""
    import pyarrow.dataset as pads

    fs, path = storage.filesystem_and_path(uri)
    if not storage.list_files(fs, path, uri):
        raise DataError(f"config key train.pairs: {uri} not found; give a Parquet file or folder of pairs")
    try:
        schema = pads.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=False).schema
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"config key train.pairs: {uri} is not readable Parquet ({e})") from None
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in schema.names]
    if missing:
        raise DataError(f"config key train.pairs: {uri} has no {', '.join(missing)} column(s) "
                        f"(columns: {', '.join(schema.names)}); pairs use TRL's prompt/chosen/rejected")


def check_shared_vocabulary(teacher_path: str, student_path: str, trust_remote_code: bool = False) -> None:
    """token_kd compares token distributions position by position: both tokenizers must be one vocabulary."""
    from transformers import AutoConfig

    if not shares_vocabulary(teacher_path, student_path, trust_remote_code):
        raise ConfigError("config key train.loss.type: token_kd needs teacher and student to share a vocabulary "
                          "(their tokenizers map ids to different tokens); "
                          "use hinge, logistic or seqkd, which only need the teacher's text")
    # One tokenizer can sit on embedding matrices of different heights (vocabularies padded to a multiple
    # of 64 or 128): the two logit rows then differ in width, and position-wise KL has no meaning.
    rows = [AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code).get_text_config().vocab_size
            for p in (teacher_path, student_path)]
    if rows[0] != rows[1]:
        raise ConfigError(f"config key train.loss.type: token_kd needs logits of one width, but the teacher has "
                          f"{rows[0]} embedding rows and the student {rows[1]} (a padded vocabulary); "
                          f"use seqkd or a PLaD loss, which only need the teacher's text")


def train_student(cfg: Config, inputs: Inputs, log=print, round: int = 1) -> dict:
    """Train on round `round`'s pairs, evaluate before/after, export the student; writes train_report.json."""
    from transformers import AutoTokenizer

    from plad_ray.train.driver import run_training

    report_uri, export_uri = storage.join(cfg.round_dir(round), "train_report.json"), cfg.student_export_uri(round)
    done = storage.read_json(report_uri)
    if done is not None and storage.manifest(export_uri) is not None:
        log(f"[train] round {round} already complete: {export_uri} and {report_uri}")
        return done
    student_path = inputs.student_path if round == 1 else storage.local_path(cfg.student_export_uri(round - 1))
    if cfg.train.pairs is not None:
        import ray.data

        pairs_ds = ray.data.read_parquet(cfg.train.pairs, file_extensions=["parquet"]).map_batches(
            pairs.complete_external, fn_kwargs={"heldout_fraction": cfg.data.heldout_fraction}, batch_format="pandas")
    else:
        pairs_ds = parquet.read(cfg.pairs_uri(round))
    if pairs_ds is None:
        raise DataError(f"pairs {cfg.pairs_uri(round)}: missing or incomplete; run jobs.generate_pairs first")
    tokenizer = AutoTokenizer.from_pretrained(student_path, trust_remote_code=cfg.student.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    s = cfg.student
    stops = (None, None) if cfg.train.pairs is not None else (cfg.teacher.sampling.stop, s.sampling.stop)
    result = run_training(pairs_ds, student_path, cfg.train, cfg.cluster, cfg.round_dir(round), export_uri, pad_id,
                          s.chat_template, s.trust_remote_code, s.allow_pickle_weights, inputs.teacher_path, stops)
    result["train_seconds"] = time.perf_counter() - start
    result["round"] = round
    storage.write_json(report_uri, result)
    log(f"[train] round {round} report -> {report_uri}")
    return result


def evaluate(cfg: Config, check_only: bool = False, log=print) -> dict | None:
    """jobs.evaluate: the evaluate stage on a finished run; adds `evaluation` to its report.json."""
    from plad_ray import cluster
    from plad_ray.evaluation.stage import evaluate_run

    for uri in (cfg.teacher_cache_uri(), cfg.student_export_uri(cfg.train.rounds)):
        if storage.manifest(uri) is None:
            raise DataError(f"output_dir {cfg.output_dir}: {uri} is missing or incomplete; "
                            "evaluate a run that jobs.distill (or jobs.generate_pairs + jobs.train) finished")
    inputs = check_inputs(cfg, prompts=False, teacher=False, log=log)
    cluster.check_local(cfg, generation=True, training=False)
    prepare_output(cfg, dry_run=check_only, log=log)
    if check_only:
        log("[plad-ray] --check: config, run outputs, models and resources are fine; nothing was started")
        return None
    cluster.start(cfg, generation=True, training=False, log=log)
    evaluation = evaluate_run(cfg, inputs.student_path, log=log, force=True)
    report = storage.read_json(cfg.report_uri())
    if report is not None:
        report["evaluation"] = evaluation
        storage.write_json(cfg.report_uri(), report)
    return evaluation


def write_report(cfg: Config, rounds: list[dict], generation: dict | None = None,
                 evaluation: dict | None = None, log=print) -> dict:
    """report.json: the last round's training figures, one line per round, generation and evaluation."""
    report = dict(rounds[-1])
    report["rounds"] = [{k: r.get(k) for k in ("round", "steps", "counts", "eval_initial", "eval_trained",
                                                "guard", "checkpoint", "train_seconds")} for r in rounds]
    if generation is not None:
        report["generation"] = generation
    if evaluation is not None:
        report["evaluation"] = evaluation
    storage.write_json(cfg.report_uri(), report)
    log(f"[plad-ray] report -> {cfg.report_uri()}; summary -> {write_summary(report, cfg.output_dir)}")
    return report


def distill(cfg: Config, overwrite: bool = False, check_only: bool = False, log=print) -> dict | None:
    """The whole pipeline; returns the report with generation figures added (None with check_only)."""
    inputs = prepare(cfg, generation=True, training=True, overwrite=overwrite, check_only=check_only, log=log)
    if inputs is None:
        return None
    figures = {"prompts": inputs.prompts.num_rows, "prompts_quarantined": len(inputs.quarantined),
               "prompts_truncated": inputs.truncated}
    figures.update(generate_teacher(cfg, inputs, log))
    from plad_ray.evaluation.stage import evaluate_run, start_initial

    rounds, evaluation = [], None
    with ThreadPoolExecutor(max_workers=1) as pool:
        initial = None
        for r in range(1, cfg.train.rounds + 1):
            generated = generate_pairs(cfg, inputs, log, round=r)
            if r == 1:
                figures.update(generated)
                initial = start_initial(cfg, inputs.student_path, pool)  # runs while the student trains
            rounds.append({**train_student(cfg, inputs, log, round=r), "pair_generation": generated})
        if cfg.eval.enabled:
            evaluation = evaluate_run(cfg, inputs.student_path, log=log, initial_outputs=initial)
    return write_report(cfg, rounds, figures, evaluation, log)
