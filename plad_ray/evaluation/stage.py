"""The evaluate stage: held-out prompts -> greedy vLLM generations -> quality and calibration.

    held-out prompt ids --teacher cache--> teacher outputs (no new teacher tokens)
                        --student vLLM, greedy, token log-probs--> initial / trained student outputs
    -> exact match, ROUGE-L (against `reference`), verifier accuracy and win rate vs the teacher
       (train.scorer or eval.scorer), ECE of exp(mean token log-prob) against correctness
    -> eval/report.json, eval/summary.md, eval/reliability.png, eval/generations.jsonl

Held-out prompts are those whose pairs were kept out of training (data.heldout_fraction),
so the trained student never saw their teacher outputs. Each round's student is evaluated
(rounds > 1), and the student before training unless eval.initial_student is off.
"""

import dataclasses
import json
import time

import pyarrow as pa

from plad_ray import pairs
from plad_ray.config import Config
from plad_ray.data import parquet, storage
from plad_ray.data.prompts import read_prompts
from plad_ray.errors import DataError
from plad_ray.evaluation.metrics import (confidence, exact_match, expected_calibration_error, mean,
                                         reliability_bins, rouge_l, win_rate)
from plad_ray.evaluation.report import markdown, reliability_png
from plad_ray.scoring import get_scorer


def heldout_rows(cfg: Config) -> list[dict]:
    """id, prompt, teacher output and reference (None without one) of every held-out prompt."""
    table = parquet.read_table(cfg.teacher_cache_uri(), ["id", "prompt", "teacher_text"])
    if table is None:
        raise DataError(f"teacher cache {cfg.teacher_cache_uri()}: missing; run jobs.generate_pairs or jobs.distill first")
    references = read_prompts(cfg.data.prompts, cfg.data.max_prompts, "quarantine").references
    rows = [r for r in table.to_pylist() if pairs.is_heldout(r["id"], cfg.data.heldout_fraction)]
    rows.sort(key=lambda r: r["id"])
    rows = rows[: cfg.eval.max_prompts] if cfg.eval.max_prompts else rows
    if not rows:
        raise DataError(f"evaluation: no held-out prompt among {table.num_rows} (data.heldout_fraction "
                        f"{cfg.data.heldout_fraction}); raise data.heldout_fraction or add prompts")
    return [{**r, "reference": references.get(r["id"])} for r in rows]


def generate(cfg: Config, rows: list[dict], model_path: str, use_gpu: bool) -> list[dict]:
    """Greedy outputs of `model_path` with the student's engine settings, and their mean token log-prob."""
    import ray.data

    from plad_ray.generate.engines import build_engine_processor, engine_deaths, sampling_params, spread

    engine = dataclasses.replace(cfg.student, sampling=dataclasses.replace(cfg.student.sampling, temperature=0.0))
    params = {**sampling_params(engine), "logprobs": 0}  # 0: only the generated token's own log-prob

    def preprocess(row: dict) -> dict:
        source = {"messages": [{"role": "user", "content": row["prompt"]}]} if engine.chat_template \
            else {"prompt": row["prompt"]}
        return {"source_prompt": row["prompt"], "sampling_params": params, **source}

    def postprocess(row: dict) -> dict:
        tokens = [int(t) for t in row["generated_tokens"]]
        logps = token_logprobs(row.get("logprobs"), tokens)
        return {"id": row["id"], "text": row["generated_text"], "num_tokens": len(tokens),
                "mean_logprob": sum(logps) / len(logps) if logps else 0.0}

    ds = spread(ray.data.from_arrow(pa.Table.from_pylist([{"id": r["id"], "prompt": r["prompt"]} for r in rows])),
                len(rows), engine.batch_size, engine.replicas)
    with engine_deaths("student", engine):  # evaluation runs the student's engine settings
        out = build_engine_processor(engine, model_path, use_gpu, preprocess, postprocess)(ds).take_all()
    by_id = {r["id"]: r for r in out}
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


def score_outputs(rows: list[dict], outputs: list[dict] | None, scorer_name: str | None, num_bins: int) -> dict:
    """Metrics of one model's outputs (None: the teacher's cached outputs) on the held-out rows."""
    scorer = get_scorer(scorer_name) if scorer_name else None
    texts = [r["teacher_text"] for r in rows] if outputs is None else [o["text"] for o in outputs]
    refs = [(t, r["reference"]) for t, r in zip(texts, rows) if r["reference"] is not None]
    m: dict = {"prompts": len(rows)}
    if refs:
        m["references"] = len(refs)
        m["exact_match"] = mean([exact_match(t, ref) for t, ref in refs])
        m["rouge_l"] = mean([rouge_l(t, ref) for t, ref in refs])
    if scorer is not None:
        scores = [scorer(r["prompt"], t) for r, t in zip(rows, texts)]
        m["verifier_accuracy"] = mean([float(s >= 1.0) for s in scores])
        if outputs is not None:
            m["vs_teacher"] = win_rate(scores, [scorer(r["prompt"], r["teacher_text"]) for r in rows])
    elif refs and outputs is not None:  # no verifier: judge both against the reference by ROUGE-L
        m["vs_teacher"] = {**win_rate([rouge_l(t, r["reference"]) for t, r in zip(texts, rows) if r["reference"]],
                                      [rouge_l(r["teacher_text"], r["reference"]) for r in rows if r["reference"]]),
                           "judged_by": "rouge_l against reference"}
    if outputs is not None:
        m["mean_tokens"] = mean([o["num_tokens"] for o in outputs])
        conf = [confidence(o["mean_logprob"]) for o in outputs]
        m["mean_confidence"] = mean(conf)
        correct = ([float(s >= 1.0) for s in scores] if scorer is not None
                   else [exact_match(t, r["reference"]) for t, r in zip(texts, rows)] if len(refs) == len(rows)
                   else None)
        if correct is not None:
            m["ece"] = expected_calibration_error(conf, correct, num_bins)
            m["reliability"] = reliability_bins(conf, correct, num_bins)
    return m


def evaluate_run(cfg: Config, initial_student_path: str | None, log=print, force: bool = False) -> dict:
    """Evaluate the run's students on its held-out prompts; writes eval/ and returns the figures.

    A finished evaluation with the same settings is reused unless `force` (jobs.evaluate).
    """
    start = time.perf_counter()
    scorer = cfg.eval.scorer or cfg.train.scorer
    settings = {**dataclasses.asdict(cfg.eval), "rounds": cfg.train.rounds, "scorer": scorer}
    done = storage.read_json(storage.join(cfg.eval_dir(), "report.json"))
    if done is not None and done.get("settings") == settings and not force:
        log(f"[eval] already complete: {cfg.eval_dir()}")
        return done
    rows = heldout_rows(cfg)
    models = {}
    if cfg.eval.initial_student and initial_student_path:
        models["initial student"] = initial_student_path
    for r in range(1, cfg.train.rounds + 1):
        uri = cfg.student_export_uri(r)
        if storage.manifest(uri) is None:
            raise DataError(f"evaluation: {uri} is missing or incomplete; train first (jobs.train or jobs.distill)")
        models["trained student" if cfg.train.rounds == 1 else f"round {r} student"] = storage.local_path(uri)
    log(f"[eval] {len(rows)} held-out prompts ({sum(r['reference'] is not None for r in rows)} with references), "
        f"scorer {scorer or 'none'}; greedy vLLM generation for: {', '.join(models)}")
    results = {"teacher (cached outputs)": score_outputs(rows, None, scorer, cfg.eval.num_bins)}
    generations = {r["id"]: {"id": r["id"], "prompt": r["prompt"], "reference": r["reference"],
                             "teacher": r["teacher_text"]} for r in rows}
    for name, path in models.items():
        outputs = generate(cfg, rows, path, cfg.cluster.use_gpu)
        results[name] = {"model": path, **score_outputs(rows, outputs, scorer, cfg.eval.num_bins)}
        for o in outputs:
            generations[o["id"]][name] = o["text"]
            generations[o["id"]][f"{name} mean_logprob"] = o["mean_logprob"]
        log(f"[eval] {name}: {headline(results[name])}")
    report = {"settings": settings, "scorer": scorer, "heldout_fraction": cfg.data.heldout_fraction, "models": results,
              "eval_seconds": time.perf_counter() - start}
    folder = cfg.eval_dir()
    storage.write_text(storage.join(folder, "generations.jsonl"),
                       "".join(json.dumps(g) + "\n" for g in generations.values()))
    storage.write_bytes(storage.join(folder, "reliability.png"), reliability_png(results))
    storage.write_text(storage.join(folder, "summary.md"), markdown(report, "reliability.png"))
    storage.write_json(storage.join(folder, "report.json"), report)
    log(f"[eval] report -> {storage.join(folder, 'report.json')} (+ summary.md, reliability.png, generations.jsonl)")
    return report


def headline(m: dict) -> str:
    parts = [f"{k} {m[k]:.3f}" for k in ("verifier_accuracy", "exact_match", "rouge_l", "ece", "mean_confidence")
             if k in m]
    if "vs_teacher" in m:
        parts.append(f"win rate vs teacher {m['vs_teacher']['win_rate']:.3f}")
    return ", ".join(parts)
