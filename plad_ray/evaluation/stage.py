"""The evaluate stage: held-out prompts -> vLLM generations -> task quality first, then calibration.

    held-out prompt ids --teacher cache--> teacher outputs (no new teacher tokens)
                        --student vLLM, greedy (+ eval.num_samples samples at T=1), token log-probs-->
                          initial / trained student outputs
    -> exact match, ROUGE-L (against `reference`), verifier accuracy (eval.scorer), a graded score
       (eval.graded_scorer), win rates vs the teacher and vs the initial student, sampled and
       best-of-n accuracy, ECE and AUROC of exp(mean token log-prob) against correctness
    -> eval/report.json, eval/summary.md, eval/reliability.png, eval/generations.jsonl

Held-out prompts are those whose pairs were kept out of training (data.heldout_fraction),
so the trained student never saw their teacher outputs. Each round's student is evaluated
(rounds > 1), and the student before training unless eval.initial_student is off; their
engines run at the same time where the cluster has room (one engine start each, not in turn).
"""

import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from plad_ray import pairs
from plad_ray.config import Config, EvalConfig, StudentEngineConfig
from plad_ray.data import parquet, storage
from plad_ray.data.prompt_checks import source_rows
from plad_ray.data.prompts import engine_prompt
from plad_ray.errors import DataError
from plad_ray.evaluation.metrics import (
    auroc,
    best_of_n,
    calibration_note,
    confidence,
    correctness_of,
    exact_match,
    expected_calibration_error,
    mean,
    reliability_bins,
    rouge_l,
    win_rate,
)
from plad_ray.evaluation.report import markdown, reliability_png
from plad_ray.generate.schemas import TEACHER_READ_BY_EVALUATION
from plad_ray.run_context import RunContext
from plad_ray.verifiers import get_scorer

TEACHER = "teacher (cached outputs)"
INITIAL = "initial student"


@dataclass(frozen=True)
class EvalPlan:
    """What the evaluate stage is given (`EvalPlan.of` a run's config): its section, the student's engine settings
    every student generation runs with, the run, how many rounds' students there are, the verifier that judges
    generations, and the prompt source with its cap (the references of jobs.evaluate, read again)."""

    eval: EvalConfig
    engine: StudentEngineConfig
    run: RunContext
    rounds: int
    scorer: str | None
    prompts: str
    max_prompts: int | None

    @classmethod
    def of(cls, cfg: Config) -> "EvalPlan":
        source = (cfg.data.prompts, cfg.data.max_prompts)
        return cls(cfg.eval, cfg.student, cfg.context(), cfg.train.rounds, verifier(cfg), *source)


def heldout_rows(plan: EvalPlan, prompts=None) -> list[dict]:
    """id, prompt, teacher output and reference (None without one) of every held-out prompt, by id, at
    most eval.max_prompts. Ray tasks read the teacher cache and keep the held-out rows; only those (bounded by
    eval.max_prompts) come to the driver. The references come from `prompts`, the run's checked prompts (id,
    prompt, reference; already in the object store), else (jobs.evaluate) from the prompt source, read again."""
    layout, fraction = plan.run.layout, plan.run.heldout_fraction
    made = layout.teacher_made()
    parquet.require_columns(layout.teacher(), TEACHER_READ_BY_EVALUATION, "teacher outputs")
    teacher = parquet.read(layout.teacher())
    held = (
        teacher.select_columns(["id", "prompt", "teacher_text"])
        .map_batches(_heldout, fn_kwargs={"fraction": fraction}, batch_format="pyarrow")
        .sort("id")
    )
    where = f"among {made['rows']} (data.heldout_fraction {fraction})"
    return _with_references(plan, held, where, prompts)


def heldout_rows_of_pairs(plan: EvalPlan, pairs_uri: str) -> list[dict]:
    """heldout_rows for pairs made elsewhere (train.pairs): the held-out pairs' prompts, one row per prompt with its
    teacher output (the pairs' chosen side), references from the prompt source."""
    parquet.require_columns(pairs_uri, ("id", "prompt", "chosen", "heldout"), "pairs")
    held = (
        parquet.read(pairs_uri)
        .select_columns(["id", "prompt", "chosen", "heldout"])
        .map_batches(_first_heldout_per_id, batch_format="pyarrow")
        .groupby("id")
        .map_groups(_first_heldout_per_id, batch_format="pyarrow")
        .sort("id")
    )
    return _with_references(plan, held, f"in {pairs_uri} (its `heldout` column)")


def _first_heldout_per_id(table: pa.Table) -> pa.Table:
    """The held-out rows, one per prompt id, as (id, prompt, teacher_text)."""
    import pyarrow.compute as pc

    table = table.filter(pc.fill_null(table.column("heldout"), False)) if "heldout" in table.column_names else table
    seen, keep = set(), []
    for i, pid in enumerate(table.column("id").to_pylist()):
        if pid not in seen:
            seen.add(pid)
            keep.append(i)
    first = table.take(pa.array(keep, pa.int64()))
    text = "chosen" if "chosen" in first.column_names else "teacher_text"
    return pa.table({"id": first.column("id"), "prompt": first.column("prompt"), "teacher_text": first.column(text)})


def _with_references(plan: EvalPlan, held, where: str, prompts=None) -> list[dict]:
    rows = (held.limit(plan.eval.max_prompts) if plan.eval.max_prompts else held).take_all()
    if not rows:
        raise DataError(f"evaluation: no held-out prompt {where}; raise data.heldout_fraction or add prompts")
    ids = pa.array([r["id"] for r in rows], pa.string())
    source = source_rows(plan.prompts, plan.max_prompts) if prompts is None else prompts
    references = source.map_batches(
        _references_of, fn_kwargs={"ids": ids}, batch_format="pyarrow"
    ).take_all()  # at most one per held-out row
    by_id = {r["id"]: r["reference"] for r in references}
    return [{**r, "reference": by_id.get(r["id"])} for r in rows]


def _heldout(table: pa.Table, fraction: float) -> pa.Table:
    keep = [pairs.is_heldout(i, fraction) for i in table.column("id").to_pylist()]
    return table.filter(pa.array(keep, pa.bool_()))


def _references_of(table: pa.Table, ids: pa.Array) -> pa.Table:
    """The references of these ids, from good source rows (checked prompts have no `check` column: all good)."""
    import pyarrow.compute as pc

    good = pc.is_null(table.column("check")) if "check" in table.column_names else pa.scalar(True)
    keep = pc.and_(pc.and_(good, pc.is_valid(table.column("reference"))), pc.is_in(table.column("id"), value_set=ids))
    return table.filter(pc.fill_null(keep, False)).select(["id", "reference"])


def generate(plan: EvalPlan, rows: list[dict], model_path: str) -> list[dict]:
    """Per held-out row, `model_path`'s greedy output and eval.num_samples samples at temperature 1
    (student engine settings), each with its mean token log-prob; one engine pass for all of them."""
    import ray.data

    from plad_ray.generate.engines import build_engine_processor, engine_deaths, sampling_params, split_for_replicas

    engine = dataclasses.replace(plan.engine, sampling=dataclasses.replace(plan.engine.sampling, temperature=0.0))
    num_samples = plan.eval.num_samples
    greedy = {**sampling_params(engine), "logprobs": 0}  # 0: only the generated token's own log-prob
    sampled = [
        {**greedy, "temperature": 1.0, "top_p": 1.0, "seed": plan.engine.sampling.seed + k} for k in range(num_samples)
    ]

    def preprocess(row: dict) -> dict:
        k = int(row["sample"])
        return {
            "source_prompt": row["prompt"],
            "sampling_params": greedy if k < 0 else sampled[k],
            **engine_prompt(row["prompt"], engine.chat_template),
        }

    def postprocess(row: dict) -> dict:
        tokens = [int(t) for t in row["generated_tokens"]]
        logps = token_logprobs(row.get("logprobs"), tokens)
        return {
            "id": row["id"],
            "sample": int(row["sample"]),
            "text": row["generated_text"],
            "num_tokens": len(tokens),
            "mean_logprob": sum(logps) / len(logps) if logps else 0.0,
        }

    requests = [{"id": r["id"], "prompt": r["prompt"], "sample": k} for r in rows for k in range(-1, num_samples)]
    ds = split_for_replicas(
        ray.data.from_arrow(pa.Table.from_pylist(requests)), len(requests), engine.batch_size, engine.replicas
    )
    with engine_deaths("student", engine):  # evaluation runs the student's engine settings
        out = build_engine_processor(engine, model_path, plan.run.use_gpu, preprocess, postprocess)(ds).take_all()
    by_id: dict[str, dict] = {r["id"]: {"samples": [None] * num_samples} for r in rows}
    for o in out:
        if o["sample"] < 0:
            by_id[o["id"]].update(o)
        else:
            by_id[o["id"]]["samples"][o["sample"]] = {"text": o["text"], "mean_logprob": o["mean_logprob"]}
    return [by_id[r["id"]] for r in rows]


def token_logprobs(logprobs, tokens: list[int]) -> list[float]:
    """Per generated token, vLLM's log-prob of that token (rows of {token id: {logprob, ...}})."""
    if logprobs is None:
        raise DataError("evaluation: the engine returned no log-probs; this vLLM build ignores sampling logprobs")
    out = []
    for entry, token in zip(logprobs, tokens):
        entry = {int(k): v for k, v in entry.items() if v is not None}
        out.append(float(entry[token]["logprob"]))
    return out


def judge_scores(rows: list[dict], texts: list[str], scorer_name: str | None, graded_name: str | None) -> list | None:
    """Per-prompt scores for win rates: the graded scorer, else the verifier, else ROUGE-L vs the reference."""
    name = graded_name or scorer_name
    if name:
        scorer = get_scorer(name)
        return [scorer(r["prompt"], t) for r, t in zip(rows, texts)]
    if all(r["reference"] is not None for r in rows):
        return [rouge_l(t, r["reference"]) for t, r in zip(texts, rows)]
    return None


def score_outputs(
    rows: list[dict], outputs: list[dict] | None, scorer_name: str | None, num_bins: int, graded_name: str | None = None
) -> dict:
    """Metrics of one model's outputs (None: the teacher's cached outputs) on the held-out rows."""
    scorer = get_scorer(scorer_name) if scorer_name else None
    texts = [r["teacher_text"] for r in rows] if outputs is None else [o["text"] for o in outputs]
    refs = [(t, r["reference"]) for t, r in zip(texts, rows) if r["reference"] is not None]
    m: dict = {"prompts": len(rows)}
    if refs:
        m["references"] = len(refs)
        m["exact_match"] = mean([exact_match(t, ref) for t, ref in refs])
        m["rouge_l"] = mean([rouge_l(t, ref) for t, ref in refs])

    def correctness(prompt_texts: list[str]) -> list[float] | None:
        if scorer is None and len(refs) < len(rows):
            return None
        return [correctness_of(r, t, scorer) for r, t in zip(rows, prompt_texts)]

    correct = correctness(texts)
    if scorer is not None:
        m["verifier_accuracy"] = mean(correct)
    if graded_name:
        graded = get_scorer(graded_name)
        m["graded_score"] = mean([graded(r["prompt"], t) for r, t in zip(rows, texts)])
    judged = judge_scores(rows, texts, scorer_name, graded_name)
    if outputs is not None and judged is not None:
        teacher = judge_scores(rows, [r["teacher_text"] for r in rows], scorer_name, graded_name)
        m["vs_teacher"] = {**win_rate(judged, teacher), "judged_by": _judge_name(scorer_name, graded_name)}
    if outputs is None:
        return m
    m["mean_tokens"] = mean([o["num_tokens"] for o in outputs])
    conf = [confidence(o["mean_logprob"]) for o in outputs]
    m["mean_confidence"] = mean(conf)
    if correct is not None:
        m["ece"] = expected_calibration_error(conf, correct, num_bins)
        m["auroc"] = auroc(conf, correct)
        m["reliability"] = reliability_bins(conf, correct, num_bins)
        m["calibration_note"] = calibration_note(correct)
    samples = [o.get("samples") or [] for o in outputs]
    if correct is not None and samples and all(samples):
        per_prompt = _sample_correctness(samples, correctness)
        m["num_samples"] = len(samples[0])
        m["sampled_accuracy"] = mean([ok for prompt in per_prompt for _, ok in prompt])
        m["best_of_n_accuracy"] = best_of_n(per_prompt)
    return m


def _sample_correctness(samples: list[list[dict]], correctness) -> list[list[tuple[float, float]]]:
    """(mean log-prob, correct) of every sample of every prompt (each prompt has the same number)."""
    right_by_k = [correctness([prompt[k]["text"] for prompt in samples]) for k in range(len(samples[0]))]
    return [[(s["mean_logprob"], right_by_k[k][p]) for k, s in enumerate(prompt)] for p, prompt in enumerate(samples)]


def _judge_name(scorer_name: str | None, graded_name: str | None) -> str:
    return graded_name or scorer_name or "rouge_l against reference"


def _settings(plan: EvalPlan) -> dict:
    return {**dataclasses.asdict(plan.eval), "rounds": plan.rounds, "scorer": plan.scorer}


def _finished(plan: EvalPlan) -> dict | None:
    done = storage.read_json(storage.join(plan.run.layout.eval(), "report.json"))
    return done if done is not None and done.get("settings") == _settings(plan) else None


def start_initial(plan: EvalPlan, initial_student_path: str | None, pool, prompts=None):
    """The initial student's generations, started on `pool` now: they need no trained model, so they
    overlap training (the engine waits for room where the trainer holds the accelerators). None when
    there is nothing to do."""
    if not (plan.eval.enabled and plan.eval.initial_student and initial_student_path) or _finished(plan):
        return None
    return pool.submit(generate, plan, heldout_rows(plan, prompts), initial_student_path)


def evaluate_run(
    plan: EvalPlan, initial_student_path: str | None, log=print, force: bool = False, initial_outputs=None, prompts=None
) -> dict:
    """Evaluate the run's students on its held-out prompts; writes eval/ and returns the figures.

    A finished evaluation with the same settings is reused unless `force` (jobs.evaluate).
    `initial_outputs`: a future of the initial student's generations (start_initial).
    """
    start = time.perf_counter()
    scorer, layout = plan.scorer, plan.run.layout
    settings = _settings(plan)
    done = _finished(plan)
    if done is not None and not force:
        log(f"[eval] already complete: {layout.eval()}")
        return done
    rows = heldout_rows(plan, prompts)
    models = {}
    if plan.eval.initial_student and initial_student_path:
        models[INITIAL] = initial_student_path
    for r in range(1, plan.rounds + 1):
        uri = layout.student(r)
        if storage.manifest(uri) is None:
            raise DataError(f"evaluation: {uri} is missing or incomplete; train first (jobs.train or jobs.distill)")
        name = "trained student" if plan.rounds == 1 else f"round {r} student"
        models[name] = plan.run.student_after(r)  # a URI output_dir's export: fetched to every node
    extra = f" + {plan.eval.num_samples} samples at T=1" if plan.eval.num_samples else ""
    log(
        f"[eval] {len(rows)} held-out prompts ({sum(r['reference'] is not None for r in rows)} with references), "
        f"scorer {scorer or 'none'}; greedy{extra} vLLM generation for: {', '.join(models)}"
    )
    with ThreadPoolExecutor(max_workers=len(models)) as pool:  # Ray queues engines the cluster cannot fit yet
        futures = {
            name: initial_outputs
            if name == INITIAL and initial_outputs is not None
            else pool.submit(generate, plan, rows, path)
            for name, path in models.items()
        }
        outputs = {name: future.result() for name, future in futures.items()}
    graded, bins = plan.eval.graded_scorer, plan.eval.num_bins
    results = {TEACHER: score_outputs(rows, None, scorer, bins, graded)}
    generations = {
        r["id"]: {"id": r["id"], "prompt": r["prompt"], "reference": r["reference"], "teacher": r["teacher_text"]}
        for r in rows
    }
    for name, path in models.items():
        results[name] = {"model": path, **score_outputs(rows, outputs[name], scorer, bins, graded)}
        if INITIAL in outputs and name != INITIAL:
            judged, base = (
                judge_scores(rows, [o["text"] for o in outputs[n]], scorer, graded) for n in (name, INITIAL)
            )
            if judged is not None:
                results[name]["vs_initial"] = {**win_rate(judged, base), "judged_by": _judge_name(scorer, graded)}
        for o in outputs[name]:
            generations[o["id"]][name] = o["text"]
            generations[o["id"]][f"{name} mean_logprob"] = o["mean_logprob"]
            if o["samples"]:
                generations[o["id"]][f"{name} samples"] = o["samples"]
        log(f"[eval] {name}: {headline(results[name])}")
    report = {
        "settings": settings,
        "scorer": scorer,
        "graded_scorer": graded,
        "heldout_fraction": plan.run.heldout_fraction,
        "models": results,
        "eval_seconds": time.perf_counter() - start,
    }
    folder = layout.eval()
    storage.write_text(
        storage.join(folder, "generations.jsonl"), "".join(json.dumps(g) + "\n" for g in generations.values())
    )
    storage.write_bytes(storage.join(folder, "reliability.png"), reliability_png(results))
    storage.write_text(storage.join(folder, "summary.md"), markdown(report, "reliability.png"))
    storage.write_json(storage.join(folder, "report.json"), report)
    log(f"[eval] report -> {storage.join(folder, 'report.json')} (+ summary.md, reliability.png, generations.jsonl)")
    return report


def headline(m: dict) -> str:
    parts = [
        f"{k} {m[k]:.3f}"
        for k in (
            "verifier_accuracy",
            "exact_match",
            "graded_score",
            "rouge_l",
            "sampled_accuracy",
            "best_of_n_accuracy",
            "ece",
            "auroc",
            "mean_confidence",
        )
        if isinstance(m.get(k), float)
    ]
    for key, name in (("vs_teacher", "win rate vs teacher"), ("vs_initial", "win rate vs initial student")):
        if key in m:
            parts.append(f"{name} {m[key]['win_rate']:.3f}")
    return ", ".join(parts)


def verifier(cfg: Config) -> str | None:
    """The scorer that judges generations: eval.scorer, else train.scorer when that one reads text (the teacher
    scorer judges pairs by the teacher's log-probs, which new generations do not have)."""
    from plad_ray.verifiers import TEACHER

    return cfg.eval.scorer or (cfg.train.scorer if cfg.train.scorer != TEACHER else None)
