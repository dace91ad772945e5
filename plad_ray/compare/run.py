"""`plad-ray compare`: which objective for this task, at what rate, and how sure.

    config --engine, once--> <out>/pairs/ (teacher outputs, pairs; teacher scores when an objective reads them)
    held-out prompts (data.heldout_fraction) -> dev / test (plan.is_dev)
    per objective, seed 0: train at each grid rate -> vLLM greedy (+ eval.num_samples samples) on dev + test
                           the grid widens (stats.next_rates) until the best dev rate is inside it
                           (tuned on dev, `hinge[beta=0.1|0.5]`: each candidate so; the best one is the objective)
    per objective, seeds 1..: train at its chosen rate (train.seed: the data order) -> test
    A/A: the default objective again at its rate, data order seed + plan.AA_SEED_OFFSET -> the noise floor
    -> compare.json (the rule, written before any arm trains; every per-prompt record), compare.md, compare.png

Every arm is an ordinary run under <out>/arms/<objective>-lr<rate>-seed<seed>/ (jobs.train on the shared pairs:
resumable, with its report), and its evaluation is kept in its result.json: re-running the same command skips
what is done. All of it is under --out.
"""

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor

from plad_ray import pipeline
from plad_ray.compare import plan, report, stats
from plad_ray.config import Config
from plad_ray.data import storage
from plad_ray.errors import ConfigError, stage


def compare(
    load, objectives: list[plan.Objective], grid: list[float], seeds: int, out: str, max_widenings: int, log=print
) -> dict:
    """`load(overrides) -> Config` gives the user's config with more --set overrides. Returns compare.json's dict.

    Arms train one at a time; each one's evaluation (a vLLM engine) runs while the next one trains."""
    # every objective's config (each candidate's, for one tuned on dev) checked before any run
    configs = {c.name: load(c.overrides) for o in objectives for c in o.choices}
    base_cfg = load([f"output_dir={storage.join(out, 'pairs')}", *_scored(configs)])
    default = objectives[0].name
    _claim(out, _settings(base_cfg, objectives, grid, seeds, max_widenings), log)
    started = time.perf_counter()
    rows, shared = _pairs(base_cfg, configs, log)
    dev_ids = [r["id"] for r in rows if plan.is_dev(r["id"])]
    test_ids = [r["id"] for r in rows if not plan.is_dev(r["id"])]
    if not dev_ids or not test_ids:
        raise ConfigError(
            f"compare: {len(rows)} held-out prompts split into {len(dev_ids)} dev and {len(test_ids)} test; raise "
            "data.heldout_fraction or data.max_prompts so both have prompts"
        )
    log(f"[compare] {len(rows)} held-out prompts: {len(dev_ids)} dev (learning rates), {len(test_ids)} test (verdict)")
    evaluate = _evaluator(base_cfg, rows)

    with ThreadPoolExecutor(max_workers=1) as evaluations:  # one engine at a time, beside the trainer
        initial_path = storage.join(out, "initial-student.json")
        initial = _done(initial_path) or evaluations.submit(
            lambda: _keep(initial_path, {"records": evaluate(_student(base_cfg))})
        )

        def arm(o: plan.Objective, lr: float, seed: int, order_seed: int | None = None) -> Future:
            """Train one arm now; its evaluation is queued. A future of its result.json."""
            order = seed if order_seed is None else order_seed
            what = f"{o.name} lr {lr:g} seed {order}"
            folder = storage.join(out, "arms", f"{o.slug}-lr{lr:g}-seed{order}")
            done = _done(storage.join(folder, "result.json"))
            if done is not None:
                return done
            log(f"[compare] {what}: training ({folder})")
            cfg = load(
                [*o.overrides, f"output_dir={folder}", *shared, f"train.learning_rate={lr}", f"train.seed={order}"]
            )
            with stage(f"compare: training {what}"):
                trained = pipeline.train(cfg, log=_quiet(log))

            def finish() -> dict:
                with stage(f"compare: evaluating {what}"):
                    records = evaluate(cfg.context().student_after(1))
                log(
                    f"[compare] {what}: dev {plan.mean_of(records, set(dev_ids)):.3f}, "
                    f"test {plan.mean_of(records, set(test_ids)):.3f}"
                )
                held_out = {k: trained.get(k) for k in ("eval_initial", "eval_trained")}
                result = {"objective": o.name, "lr": lr, "seed": seed, "order_seed": order, "steps": trained["steps"]}
                return _keep(storage.join(folder, "result.json"), {**result, "proxies": held_out, "records": records})

            return evaluations.submit(finish)

        # by candidate (an untuned objective is its own): dev curves, records per rate and seed; by objective: the
        # candidate and rate chosen on dev
        dev_curves, runs, proxies = {}, {c.name: {} for o in objectives for c in o.choices}, {}
        picked, chosen, pending = {}, {}, {}
        # The grid's first round for every objective, trained back to back while their evaluations follow.
        first = {(c.name, lr): arm(c, lr, 0) for o in objectives for c in o.choices for lr in grid}
        for o in objectives:  # the rate (and a tuned objective's setting), on dev, at seed 0
            for c in o.choices:

                def dev_scores(rates: list[float], c=c) -> dict[float, float]:
                    waiting = {lr: first.pop((c.name, lr), None) or arm(c, lr, 0) for lr in rates}
                    for lr, result in waiting.items():
                        runs[c.name].setdefault(lr, {})[0] = result.result()["records"]
                        proxies[(c.name, lr, 0)] = result.result()["proxies"]
                    return {lr: plan.mean_of(runs[c.name][lr][0], set(dev_ids)) for lr in rates}

                dev_curves[c.name] = plan.search_rate(grid, dev_scores, max_widenings)
            curves = {c.name: dev_curves[c.name] for c in o.choices}
            pick = {c.name: c for c in o.choices}[plan.best_candidate(curves)]
            picked[o.name], chosen[o.name] = pick, stats.best_rate(dev_curves[pick.name])
            edge = plan.at_edge(dev_curves[pick.name]) and len(dev_curves[pick.name]) > 1
            log(
                f"[compare] {o.name}: "
                + (f"{pick.name} at " if o.candidates else "")
                + f"lr {chosen[o.name]:g} chosen on dev"
                + (f" (still the grid's edge after {max_widenings} widenings)" if edge else "")
            )
            # Its other seeds (and for the default, the A/A control) train now, while the next objective's
            # evaluations run.
            for seed in range(1, seeds):
                pending[(o.name, seed)] = arm(pick, chosen[o.name], seed)
            if o.name == default:
                for seed in range(seeds):
                    pending[("A/A", seed)] = arm(pick, chosen[o.name], seed, seed + plan.AA_SEED_OFFSET)
        for (name, seed), result in pending.items():
            if name != "A/A":
                runs[picked[name].name][chosen[name]][seed] = result.result()["records"]
                proxies[(picked[name].name, chosen[name], seed)] = result.result()["proxies"]
        aa = {seed: result.result()["records"] for (name, seed), result in pending.items() if name == "A/A"}
        initial = initial.result()

    at_rate = {o.name: runs[picked[o.name].name][chosen[o.name]] for o in objectives}
    result = _verdicts(objectives, at_rate, aa, test_ids)
    result.update(
        rule=plan.rule(default, stats.LEVEL),
        settings=_settings(base_cfg, objectives, grid, seeds, max_widenings),
        default=default,
        chosen=chosen,
        setting={name: c.name for name, c in picked.items()},  # a tuned objective's candidate chosen on dev
        dev={name: {f"{lr:g}": v for lr, v in curve.items()} for name, curve in dev_curves.items()},  # by candidate
        edge={name: plan.at_edge(dev_curves[c.name]) for name, c in picked.items()},
        split={"dev": dev_ids, "test": test_ids},
        initial_student={"test": plan.mean_of(initial["records"], set(test_ids)), "records": initial["records"]},
        records={name: {str(s): recs for s, recs in by_seed.items()} for name, by_seed in at_rate.items()},
        aa_records={str(s): recs for s, recs in aa.items()},
        # held-out pair figures before and after training (ranking accuracy, teacher-output NLL): proxies, beside
        # the test accuracy above, never instead of it
        proxies={
            name: {str(s): proxies[(picked[name].name, chosen[name], s)] for s in by_seed}
            for name, by_seed in at_rate.items()
        },
        minutes=(time.perf_counter() - started) / 60,
    )
    report.write(out, result)
    log(report.table(result))
    log(f"[compare] results -> {storage.join(out, 'compare.json')} (+ compare.md, compare.png)")
    return result


def _pairs(base_cfg: Config, configs: dict[str, Config], log) -> tuple[list[dict], list[str]]:
    """The pairs every arm trains on, and the held-out prompts they are judged on: the config's train.pairs (made
    elsewhere; the held-out pairs' prompts), else made now by the engines under <out>/pairs/ (resumable). Also the
    overrides that point every arm at them."""
    from plad_ray import cluster
    from plad_ray.evaluation.stage import EvalPlan, heldout_rows, heldout_rows_of_pairs

    eval_plan = EvalPlan.of(base_cfg)
    if base_cfg.train.pairs is not None:
        log(f"[compare] training on the given pairs {base_cfg.train.pairs} (train.pairs); no pair generation")
        cluster.start(base_cfg, generation=True, training=True, log=log)
        return heldout_rows_of_pairs(eval_plan, base_cfg.train.pairs), []
    with stage("compare: pairs"):
        pipeline.generate(base_cfg, log=log)
    layout = base_cfg.layout()
    shared = [f"train.pairs={layout.pairs()}"]
    if _scored(configs):
        shared.append(f"train.teacher_scores={layout.scores()}")
    return heldout_rows(eval_plan), shared


def _evaluator(base_cfg: Config, rows: list[dict]):
    """model path -> per-prompt records on the held-out rows (vLLM, the student's engine settings)."""
    from plad_ray.evaluation.stage import EvalPlan, generate

    eval_plan, correct = EvalPlan.of(base_cfg), _judge(base_cfg)
    return lambda model_path: plan.prompt_scores(rows, generate(eval_plan, rows, model_path), correct)


def _verdicts(objectives, at_rate: dict, aa: dict, test_ids: list[str]) -> dict:
    """Per objective: its test accuracy per seed, and against the default its interval and verdict; the A/A
    control's interval and the floor it sets."""
    default = objectives[0].name
    base = plan.scores_by_seed(at_rate[default], test_ids)
    sampled = all("best_of_n" in r for recs in at_rate[default].values() for r in recs)  # eval.num_samples was set
    base_bon = plan.scores_by_seed(at_rate[default], test_ids, "best_of_n") if sampled else None
    aa_ci = stats.hierarchical_bootstrap(stats.paired_differences(plan.scores_by_seed(aa, test_ids), base))
    floor = stats.noise_floor(aa_ci)
    arms = {}
    for o in objectives:
        scores = plan.scores_by_seed(at_rate[o.name], test_ids)
        entry = {
            "test": sum(map(sum, scores)) / (len(scores) * len(test_ids)),
            "per_seed": [sum(s) / len(s) for s in scores],
        }
        bon = [r for recs in at_rate[o.name].values() for r in recs if "best_of_n" in r]
        if bon:
            entry["best_of_n"] = plan.mean_of(bon, set(test_ids), "best_of_n")
        if o.name != default:
            ci = stats.hierarchical_bootstrap(stats.paired_differences(scores, base))
            v = stats.verdict(ci, floor)
            entry.update(vs_default=ci, verdict=v.outcome, why=v.why)
            if base_bon is not None:  # PLaD's calibration claim, beside the verdict (the rule is on greedy accuracy)
                bon_scores = plan.scores_by_seed(at_rate[o.name], test_ids, "best_of_n")
                entry["best_of_n_vs_default"] = stats.hierarchical_bootstrap(
                    stats.paired_differences(bon_scores, base_bon)
                )
        arms[o.name] = entry
    return {"arms": arms, "aa": aa_ci, "noise_floor": floor}


def _scored(configs: dict[str, Config]) -> list[str]:
    """teacher.score_samples for the pairs' run when an objective reads the teacher's scores (with given pairs it
    makes nothing: train.teacher_scores names them, and config validation asks for it)."""
    needed = any(c.train.loss.objective.needs_scores for c in configs.values())
    return ["teacher.score_samples=true"] if needed else []


def _student(cfg: Config) -> str:
    """The initial student's local folder (a URI was fetched by the pairs' run)."""
    from plad_ray.checks import model_folder

    return model_folder(cfg, "student")


def _judge(cfg: Config):
    """Correctness of one output: the run's verifier (eval.scorer, else a text train.scorer), else exact match
    against the prompt's reference (evaluation.metrics.correctness_of, as the run's evaluation judges it)."""
    from plad_ray.evaluation.metrics import correctness_of
    from plad_ray.evaluation.stage import verifier
    from plad_ray.verifiers import get_scorer

    name = verifier(cfg)
    scorer = get_scorer(name) if name else None

    def correct(row: dict, text: str) -> float:
        ok = correctness_of(row, text, scorer)
        if ok is None:
            raise ConfigError(
                f"compare: held-out prompt {row['id']} has no reference and no verifier is set; set eval.scorer "
                "or give every prompt a `reference`"
            )
        return ok

    return correct


def _settings(cfg: Config, objectives, grid, seeds, max_widenings) -> dict:
    return {
        "objectives": [[o.name, list(o.overrides)] for o in objectives],
        "grid": grid,
        "max_widenings": max_widenings,
        "seeds": seeds,
        "prompts": cfg.data.prompts,
        "max_prompts": cfg.data.max_prompts,
        "teacher": cfg.teacher.model,
        "student": cfg.student.model,
    }


def _claim(out: str, settings: dict, log) -> None:
    """<out>/compare-settings.json: a re-run with the same settings resumes; other settings are refused."""
    path = storage.join(out, "compare-settings.json")
    held = storage.read_json(path)
    if held is not None and held != json.loads(json.dumps(settings)):
        raise ConfigError(
            f"--out {out} holds a comparison with other settings ({path}); give another --out, or the same "
            "--objectives, --grid, --seeds and config to resume it"
        )
    if held is None:
        storage.write_json(path, settings)
    else:
        log(f"[compare] resuming the comparison in {out}")


def _done(path: str) -> Future | None:
    """A finished result kept at `path`, as a resolved future; None when there is none."""
    done = storage.read_json(path)
    if done is None:
        return None
    future = Future()
    future.set_result(done)
    return future


def _keep(path: str, result: dict) -> dict:
    storage.write_json(path, result)
    return result


def _quiet(log):
    """An arm's own lines, without its per-step progress (the compare lines say where it is)."""
    return lambda line: None if line.startswith("[train] step") else log(line)
