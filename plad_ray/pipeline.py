"""The one place that wires the stages together: the flow of every job, and nothing else.

    prompts --teacher vLLM--> teacher/ --student vLLM--> pairs/ --DeepSpeed--> student/ --vLLM--> eval/
                                  |  (rounds r > 1: round r-1's student samples again) |
                                  +--> round-<r>/pairs/ --DeepSpeed--> round-<r>/student/ ...
    (teacher.score_samples: pairs/ --teacher vLLM, prefill--> teacher_scores/, in every round)
    (train.stream: the student vLLM's pairs feed DeepSpeed as they are made, and are written to pairs/ on the way)

Inputs are checked before Ray starts (plad_ray.checks), prompt rows by Ray Data before any
engine starts (plad_ray.data.prompt_checks). Each step reuses a complete output
of the same run in output_dir (plad_ray.outputs decides what a re-run may reuse), so a re-run
after a crash continues where it stopped: teacher outputs are generated only for prompt ids
not yet cached (generate/teacher.py), pairs only for missing (prompt, sample) keys
(generate/student.py), and training resumes from its last checkpoint (train/driver.py).
"""

import time
from concurrent.futures import ThreadPoolExecutor

from plad_ray import cluster, console
from plad_ray.checks import (
    Inputs,
    check_inputs,
    check_prompt_rows,
    check_step_budget,
    check_teacher_cache,
    fetch_models_to_nodes,
)
from plad_ray.config import Config
from plad_ray.data import storage
from plad_ray.errors import DataError, stage
from plad_ray.generate.endpoint_scores import check_teacher
from plad_ray.generate.scores import score_pairs
from plad_ray.generate.student import commit_pairs, generate_pairs, pair_stream
from plad_ray.generate.teacher import generate_teacher
from plad_ray.outputs import prepare_output
from plad_ray.summary import write_report
from plad_ray.tracking import check_trackers, log_report


def distill(
    cfg: Config, overwrite: bool = False, check_only: bool = False, log=print, command: list[str] | None = None
) -> dict | None:
    """jobs.distill: the whole pipeline; the report with generation figures (None with check_only)."""
    from plad_ray.evaluation.stage import EvalPlan, evaluate_run, start_initial
    from plad_ray.train.driver import train_student

    inputs = prepare(cfg, generation=True, training=True, overwrite=overwrite, check_only=check_only, log=log)
    if inputs is None:
        return None
    figures = {
        "prompts": inputs.num_prompts,
        "prompts_quarantined": inputs.quarantined,
        "prompts_truncated": inputs.truncated,
    }
    run, student, evaluation_plan = cfg.context(), cfg.student, EvalPlan.of(cfg)

    def train_round(r: int, stream=None) -> dict:
        return train_student(cfg.train, student, run, inputs, cfg.teacher.sampling.stop, log, round=r, stream=stream)

    with stage("teacher generation"):
        figures.update(generate_teacher(cfg.teacher, run, inputs, log))
    rounds, evaluation = [], None
    with ThreadPoolExecutor(max_workers=1) as pool:
        initial = None
        for r in range(1, cfg.train.rounds + 1):
            with stage(f"round {r} pair generation"):
                stream = pair_stream(student, run, inputs, cfg.train.seed, log, round=r) if cfg.train.stream else None
            if stream is None:
                with stage(f"round {r} pair generation"):
                    generated = generate_pairs(student, run, inputs, log, round=r)
                with stage(f"round {r} teacher scoring"):
                    generated.update(_scores(cfg, inputs, log, r))
                if r == 1:
                    # runs while the student trains
                    initial = start_initial(evaluation_plan, inputs.student_path, pool, inputs.prompts)
                with stage(f"round {r} training"):
                    trained = train_round(r)
            else:  # train.stream: the student engines feed the trainer; their pairs are committed after
                start = time.perf_counter()
                with stage(f"round {r} streamed pair generation and training"):
                    trained = train_round(r, stream)
                    generated = commit_pairs(student, run, r, start, log)
                with stage(f"round {r} teacher scoring"):  # of the committed pairs, as in a sequential round
                    generated.update(_scores(cfg, inputs, log, r))
                if cfg.train.num_epochs > 1:  # the other epochs read the committed pairs, from its checkpoint
                    with stage(f"round {r} training"):
                        trained = train_round(r)
                if r == 1:  # the engines and the trainer are done with the resources it needs
                    initial = start_initial(evaluation_plan, inputs.student_path, pool, inputs.prompts)
            if r == 1:
                figures.update(generated)
            rounds.append({**trained, "pair_generation": generated})
        if cfg.eval.enabled:
            with stage("evaluation"):
                evaluation = evaluate_run(
                    evaluation_plan, inputs.student_path, log=log, initial_outputs=initial, prompts=inputs.prompts
                )
    report = write_report(cfg, rounds, figures, evaluation, log, command)
    log_report(cfg, report, log)
    return report


def generate(cfg: Config, overwrite: bool = False, check_only: bool = False, log=print) -> dict | None:
    """jobs.generate_pairs: teacher outputs and round 1's pairs; their figures (None with check_only)."""
    inputs = prepare(cfg, generation=True, training=False, overwrite=overwrite, check_only=check_only, log=log)
    if inputs is None:
        return None
    run = cfg.context()
    with stage("teacher generation"):
        figures = generate_teacher(cfg.teacher, run, inputs, log)
    with stage("round 1 pair generation"):
        figures.update(generate_pairs(cfg.student, run, inputs, log))
    with stage("round 1 teacher scoring"):
        figures.update(_scores(cfg, inputs, log, 1))
    return figures


def _scores(cfg: Config, inputs: Inputs, log, round: int) -> dict:
    """The teacher's scores of a round's pairs, when teacher.score_samples is on; their figures under
    `teacher_scoring`."""
    if not cfg.teacher.score_samples:
        return {}
    return {"teacher_scoring": score_pairs(cfg.teacher, cfg.student, cfg.context(), inputs, log, round)}


def train(
    cfg: Config, overwrite: bool = False, check_only: bool = False, log=print, command: list[str] | None = None
) -> dict | None:
    """jobs.train: round 1's training on existing pairs; the report (None with check_only)."""
    from plad_ray.train.driver import train_student

    inputs = prepare(cfg, generation=False, training=True, overwrite=overwrite, check_only=check_only, log=log)
    if inputs is None:
        return None
    with stage("round 1 training"):
        trained = train_student(cfg.train, cfg.student, cfg.context(), inputs, cfg.teacher.sampling.stop, log)
    report = write_report(cfg, [trained], log=log, command=command)
    log_report(cfg, report, log)
    return report


def evaluate(cfg: Config, check_only: bool = False, log=print) -> dict | None:
    """jobs.evaluate: the evaluate stage on a finished run; adds `evaluation` to its report.json."""
    from plad_ray.evaluation.stage import EvalPlan, evaluate_run

    layout = cfg.layout()
    for uri in (layout.teacher(), layout.student(cfg.train.rounds)):
        if storage.manifest(uri) is None:
            raise DataError(
                f"output_dir {cfg.output_dir}: {uri} is missing or incomplete; "
                "evaluate a run that jobs.distill (or jobs.generate_pairs + jobs.train) finished"
            )
    inputs = check_inputs(cfg, prompts=False, teacher=False, log=log)
    cluster.check_local(cfg, generation=True, training=False)
    prepare_output(cfg, dry_run=check_only, log=log)
    if check_only:
        log("[plad-ray] --check: config, run outputs, models and resources are fine; nothing was started")
        return None
    cluster.start(cfg, generation=True, training=False, log=log)
    fetch_models_to_nodes(cfg, inputs)
    _log_file(cfg, log)
    with stage("evaluation"):
        evaluation = evaluate_run(EvalPlan.of(cfg), inputs.student_path, log=log, force=True)
    report = storage.read_json(layout.report())
    if report is not None:
        report["evaluation"] = evaluation
        storage.write_json(layout.report(), report)
        log_report(cfg, report, log)
    return evaluation


def _log_file(cfg: Config, log) -> None:
    """The run's log file goes under output_dir/logs/ now that output_dir is claimed; its path, once."""
    path = console.attach(cfg.layout().logs())
    if path:
        log(f"[plad-ray] engine, Ray and DeepSpeed logs -> {path} (--verbose shows them here too)")


def prepare(
    cfg: Config, generation: bool, training: bool, overwrite: bool = False, check_only: bool = False, log=print
) -> Inputs | None:
    """Everything before the expensive work: inputs, resources, output folder, then Ray, then the prompt rows
    (Ray Data) and the cached teacher outputs against them; nothing is written before the rows pass.

    With check_only (`--check`), stop before writing anything or starting Ray; None. (Prompt rows are read
    by Ray tasks: `--check` checks the source's files, not its rows.)
    """
    token_kd = training and cfg.train.loss.objective.needs_local_teacher
    inputs = check_inputs(
        cfg, prompts=generation, teacher=generation or token_kd, pairs_written=not generation, log=log
    )
    if (generation or token_kd) and cfg.teacher.endpoint is not None:
        check_teacher(cfg.teacher, inputs.student_path, cfg.student.trust_remote_code, log)
    if training:
        check_trackers(cfg.train.trackers, output_dir=cfg.output_dir)
        check_step_budget(cfg, generation)
    cluster.check_local(cfg, generation, training)
    prepare_output(cfg, overwrite, dry_run=True, log=log if check_only else (lambda _: None))
    if check_only:
        log(
            "[plad-ray] --check: config, prompt files, models, resources and output_dir are fine; nothing was started "
            "(prompt rows are checked when the run starts, before any engine)"
        )
        return None
    cluster.start(cfg, generation, training, log=log)
    fetch_models_to_nodes(cfg, inputs)
    if generation:
        with stage("prompt checks"):
            check_prompt_rows(cfg, inputs, log)
    prepare_output(cfg, overwrite, log=log)
    _log_file(cfg, log)
    if generation:
        check_teacher_cache(cfg, inputs, log)  # after --overwrite removed a stale cache
    if inputs.quarantine is not None:
        quarantine = cfg.layout().quarantine()
        storage.remove(quarantine)
        inputs.quarantine.write_json(quarantine)
        log(f"[plad-ray] {inputs.quarantined} prompt rows set aside with their reasons -> {quarantine}")
    return inputs
