"""The run's summary for people: a few terminal lines, summary.md and loss_curve.png.

report.json (`write_report`) is the machine-readable record; the rest of this module
presents it, in the order that matters: task quality on held-out prompts first (before ->
after, the teacher beside them), then whether the student kept the teacher's outputs
likely, then the proxies (ranking accuracy, ECE), which can rise while the student gets
worse and are never shown as success on their own.
"""

from plad_ray.config import Config
from plad_ray.data import storage
from plad_ray.data.layout import LOSS_CURVE, OutputLayout
from plad_ray.evaluation.report import png_bytes

NAN = float("nan")
TEACHER = "teacher (cached outputs)"
# Task-quality figures, best first: the first one a run has is its primary metric.
QUALITY = (
    ("verifier_accuracy", "verifier accuracy"),
    ("exact_match", "exact match"),
    ("graded_score", "graded score"),
    ("rouge_l", "ROUGE-L"),
    ("sampled_accuracy", "sampled accuracy"),
    ("best_of_n_accuracy", "best-of-n accuracy"),
    ("vs_teacher", "win rate vs teacher"),
    ("vs_initial", "win rate vs initial"),
)


def _value(m: dict, key: str):
    value = m.get(key)
    return value.get("win_rate") if isinstance(value, dict) else value


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and value == value else "-"


def _students(evaluation: dict) -> list[str]:
    return [name for name in evaluation.get("models", {}) if name != TEACHER]


def primary_metric(evaluation: dict) -> str | None:
    models = evaluation.get("models", {})
    for key, _ in QUALITY[:4]:
        if any(isinstance(m.get(key), float) for m in models.values()):
            return key
    return None


def teacher_nll(report: dict) -> tuple[float, float, int]:
    """Per-token NLL of the held-out teacher outputs: before the first round, after the last, and on how many."""
    rounds = report.get("rounds") or [report]
    before = (rounds[0].get("eval_initial") or {}).get("chosen_nll_per_token", NAN)
    after = (rounds[-1].get("eval_trained") or {}).get("chosen_nll_per_token", NAN)
    return before, after, (rounds[-1].get("eval_trained") or {}).get("pairs", 0)


def verdict(report: dict) -> list[str]:
    """One line on whether the student got better at the task, and warnings where it did not."""
    lines = []
    evaluation = report.get("evaluation") or {}
    key = primary_metric(evaluation)
    students = _students(evaluation)
    models = evaluation.get("models", {})
    if key and len(students) >= 2 and students[0] == "initial student":
        name = dict(QUALITY)[key]
        before, after = models[students[0]][key], models[students[-1]][key]
        if after > before:
            lines.append(
                f"verdict: the {students[-1]} is better at the task: held-out {name} {before:.3f} -> {after:.3f}"
            )
        else:
            lines.append(
                f"WARNING: the {students[-1]} is not better at the task: held-out {name} "
                f"{before:.3f} -> {after:.3f}; the proxies below do not make up for that"
            )
    elif not evaluation:
        lines.append(
            "task quality: not evaluated (eval.enabled=false or jobs.train); run jobs.evaluate on this "
            "output_dir before trusting the student"
        )
    before, after, _ = teacher_nll(report)
    if after > before:
        lines.append(
            f"WARNING: the student became less likely to write the teacher's held-out outputs "
            f"(NLL/token {before:.3f} -> {after:.3f})"
        )
    guard = report.get("guard")
    if guard:
        done = (
            f"training stopped at step {guard['stopped_at_step']}; the exported student is step "
            f"{guard['restored_step']}'s"
            if "restored_step" in guard
            else "training went on (train.guard.action=warn)"
        )
        lines.append(
            f"WARNING: collapse guard tripped at step {guard['step']}: held-out teacher-output log-prob/token "
            f"{guard['initial_logp_per_token']:.3f} -> {guard['logp_per_token']:.3f} "
            f"(limit {guard['max_logp_drop']}); {done}"
        )
    return lines


def quality_rows(evaluation: dict) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Column names (students in order, then the teacher) and (figure, cells) rows of task quality."""
    models = evaluation.get("models", {})
    names = _students(evaluation) + ([TEACHER] if TEACHER in models else [])
    rows = []
    for key, title in QUALITY:
        cells = [_fmt(_value(models[n], key)) for n in names]
        if any(c != "-" for c in cells):
            rows.append((title, cells))
    return names, rows


def quality_table(evaluation: dict, heading: str) -> list[str]:
    """The task-quality table in Markdown under `heading` (its {prompts} filled in); [] without an evaluation."""
    names, rows = quality_rows(evaluation)
    if not rows:
        return []
    prompts = next(iter(evaluation["models"].values())).get("prompts", "?")
    return [heading.format(prompts=prompts), "", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)] + [
        f"| {figure} | " + " | ".join(cells) + " |" for figure, cells in rows
    ]


def summary_lines(report: dict) -> str:
    """Task quality first, then teacher-output likelihood, then proxies, then the run's bookkeeping."""
    curve = report.get("curve") or [{}]
    counts = report.get("counts", {})
    before, after = report.get("eval_initial", {}), report.get("eval_trained", {})
    evaluation = report.get("evaluation") or {}
    lines = verdict(report)
    names, rows = quality_rows(evaluation)
    if rows:
        first = next(iter(evaluation["models"].values()))
        lines.append(f"task quality on {first.get('prompts', '?')} held-out prompts (greedy):")
        short = [n.replace(" (cached outputs)", "").replace(" student", "") for n in names]
        lines.append("  " + " " * 22 + "".join(f"{n:>12}" for n in short))
        lines += ["  " + f"{title:<22}" + "".join(f"{c:>12}" for c in cells) for title, cells in rows]
    nll_before, nll_after, pairs = teacher_nll(report)
    lines.append(
        f"teacher-output NLL/token: {nll_before:.3f} -> {nll_after:.3f} on {pairs} held-out pairs "
        "(lower: the student is likelier to write what the teacher wrote)"
    )
    lines.append("proxies (not task quality):")
    lines.append(
        f"  ranking accuracy:    {before.get('ranking_accuracy', NAN):.3f} -> "
        f"{after.get('ranking_accuracy', NAN):.3f} on {after.get('ranked_pairs', after.get('pairs', '?'))} "
        "held-out pairs"
    )
    models = evaluation.get("models", {})
    eces = [(n, models[n]) for n in _students(evaluation) if "ece" in models[n]]
    if eces:
        lines.append(
            "  ECE:                 "
            + " -> ".join(_fmt(m["ece"]) for _, m in eces)
            + "".join(f"; {n}: {m['calibration_note']}" for n, m in eces if m.get("calibration_note"))
        )
    lines += [
        f"pairs made:          {counts.get('pairs', '?')} ({counts.get('train', '?')} train, "
        f"{counts.get('heldout', '?')} held out, {counts.get('dropped_identical', 0)} identical dropped)",
        f"training loss:       {curve[0].get('loss', NAN):.4f} -> {curve[-1].get('loss', NAN):.4f} "
        f"over {report.get('steps', '?')} steps",
        f"student checkpoint:  {report.get('checkpoint', '?')}",
    ]
    return "\n".join(lines)


def markdown(report: dict, plot_name: str) -> str:
    g, c = report.get("generation", {}), report.get("counts", {})
    before, after = report.get("eval_initial", {}), report.get("eval_trained", {})
    evaluation = report.get("evaluation") or {}
    lines = ["# plad-ray run summary", "", f"Trained student: `{report.get('checkpoint')}`", ""]
    lines += [f"**{line}**" if line.startswith("WARNING") else line for line in verdict(report)] + [""]
    table = quality_table(evaluation, "## Task quality ({prompts} held-out prompts, greedy)")
    if table:
        lines += table + ["", "Details, calibration and the reliability diagram: `eval/summary.md`.", ""]
    nll_before, nll_after, pairs = teacher_nll(report)
    lines += [
        "## Did the student keep the teacher's outputs likely?",
        "",
        f"Per-token NLL of the {pairs} held-out teacher outputs: {_num(nll_before)} before training, "
        f"{_num(nll_after)} after (lower is likelier).",
        "",
    ]
    if report.get("evals"):
        lines += ["| step | teacher-output log-prob/token | ranking accuracy |", "|---|---|---|"]
        lines += [
            f"| {e['step']} | {_num(e.get('teacher_logp_per_token'))} | {_num(e.get('ranking_accuracy'))} |"
            for e in report["evals"]
        ]
        lines.append("")
    lines += [
        "## Proxies (not task quality)",
        "",
        "Ranking accuracy can rise while the student gets worse (by making both outputs less likely).",
        "",
        "| held-out pairs | before training | after training |",
        "|---|---|---|",
    ]
    for key, name in (
        ("ranking_accuracy", "ranking accuracy"),
        ("loss", "ranking loss"),
        ("margin", "margin"),
        ("objective", "trained objective"),
    ):
        lines.append(f"| {name} | {_num(before.get(key))} | {_num(after.get(key))} |")
    rows = [
        ("pairs", c.get("pairs")),
        ("training pairs", c.get("train")),
        ("held-out pairs", c.get("heldout")),
        ("identical pairs dropped", c.get("dropped_identical")),
        ("pairs over train.max_length dropped", (c.get("dropped_too_long") or 0)),
        (
            "teacher wins / ties / student wins (scorer)",
            f"{c['teacher_wins']} / {c['ties']} / {c['student_wins']}" if "teacher_wins" in c else "- (no scorer)",
        ),
        (
            "student-won pairs dropped / flipped",
            f"{c.get('dropped_student_better', 0)} / {c.get('flipped_student_better', 0)}",
        ),
        ("prompts", g.get("prompts")),
        ("prompts set aside (quarantine/prompts/)", g.get("prompts_quarantined")),
        ("prompts truncated", g.get("prompts_truncated")),
        ("teacher outputs generated / cached", f"{g.get('teacher_generated', '-')} / {g.get('teacher_cached', '-')}"),
        ("teacher tokens, seconds", f"{g.get('teacher_tokens', '-')}, {_num(g.get('teacher_seconds'))}"),
        ("student tokens, seconds", f"{g.get('student_tokens', '-')}, {_num(g.get('student_seconds'))}"),
        *_endpoint_rows(g.get("teacher_endpoint")),
        *_scoring_rows(report),
        ("optimizer steps, training seconds", f"{report.get('steps')}, {_num(report.get('train_seconds'))}"),
    ]
    lines += ["", "| run | |", "|---|---|"] + [f"| {k} | {v if v is not None else '-'} |" for k, v in rows]
    lines += ["", f"![training loss, ranking accuracy and teacher-output log-prob]({plot_name})", ""]
    return "\n".join(lines)


def _endpoint_rows(e: dict | None) -> list[tuple[str, str]]:
    """A black-box teacher's account of this run: what the server reported and what the workers waited."""
    if not e:
        return []
    return [
        ("teacher endpoint: requests / retries / throttled", f"{e['requests']} / {e['retries']} / {e['throttled']}"),
        ("teacher endpoint: seconds throttled / down", f"{_num(e['throttle_wait_s'])} / {_num(e['outage_s'])}"),
        ("teacher endpoint: usage prompt / completion tokens", f"{e['prompt_tokens']} / {e['completion_tokens']}"),
        ("teacher endpoint: prompts refused (quarantine/teacher/)", str(e["refused"])),
        # reports written before these figures existed lack them: "-"
        ("teacher endpoint: prompts failed while it answered others (quarantine/teacher/)", str(e.get("failed", "-"))),
        (
            "teacher endpoint: canaries (answered requests sent again: does it answer others?)",
            str(e.get("canaries", "-")),
        ),
    ]


def _scoring_rows(report: dict) -> list[tuple[str, str]]:
    """teacher.score_samples: each round's prefill, apart from the tokens generated."""
    rows = []
    for r in report.get("rounds") or [{"round": 1, "pair_generation": report.get("generation")}]:
        s = (r.get("pair_generation") or {}).get("teacher_scoring")
        if s:
            rows.append(
                (
                    f"round {r['round']} teacher scoring: sequences scored now / in all, prefill tokens, seconds",
                    f"{s['scored_now']} / {s['scored_sequences']}, {s.get('scoring_prefill_tokens', 0)}, "
                    f"{_num(s.get('scoring_seconds'))}",
                )
            )
            if "scores_bytes_per_token" in s:
                rows.append(
                    (
                        f"round {r['round']} teacher scores on disk: bytes per scored token (top {s['score_top_k']})",
                        _num(s["scores_bytes_per_token"]),
                    )
                )
    return rows


def _num(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"


def loss_curve_png(report: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report.get("curve") or []
    steps = [c["step"] for c in curve]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 3.5))
    left.plot(steps, [c["loss"] for c in curve], marker=".", label="training loss")
    left.set_xlabel("optimizer step")
    left.set_ylabel("PLaD loss")
    evals = [{"step": 0, **report["eval_initial"]}] if report.get("eval_initial") else []
    evals += report.get("evals") or []
    if report.get("eval_trained"):
        evals.append({"step": report.get("steps", 0), **report["eval_trained"]})
    middle.plot([e["step"] for e in evals], [-e["chosen_nll_per_token"] for e in evals], marker="o")
    middle.set_xlabel("optimizer step")
    middle.set_ylabel("held-out teacher-output log-prob / token")
    right.plot(steps, [c["accuracy"] for c in curve], marker=".", label="training pairs (window)")
    right.plot([e["step"] for e in evals], [e["ranking_accuracy"] for e in evals], "s", label="held-out")
    right.set_xlabel("optimizer step")
    right.set_ylabel("ranking accuracy (a proxy)")
    right.set_ylim(0, 1.02)
    right.legend(loc="lower right", fontsize=8)
    return png_bytes(fig)


def write_summary(report: dict, output_dir: str) -> str:
    """Write summary.md and loss_curve.png beside report.json; returns the Markdown's URI."""
    layout = OutputLayout(output_dir)
    storage.write_bytes(layout.loss_curve(), loss_curve_png(report))
    storage.write_text(layout.summary(), markdown(report, LOSS_CURVE))
    return layout.summary()


def write_report(
    cfg: Config,
    rounds: list[dict],
    generation: dict | None = None,
    evaluation: dict | None = None,
    log=print,
    command: list[str] | None = None,
) -> dict:
    """report.json: the last round's training figures, one line per round, generation and evaluation, and the
    command line that made the run (the model card quotes it, also when `plad-ray evaluate` rewrites the card)."""
    report = dict(rounds[-1])
    if command:
        report["command"] = list(command)
    report["rounds"] = [
        {
            k: r.get(k)
            for k in (
                "round",
                "steps",
                "counts",
                "eval_initial",
                "eval_trained",
                "guard",
                "checkpoint",
                "train_seconds",
                "pair_generation",
            )
        }
        for r in rounds
    ]
    if generation is not None:
        report["generation"] = generation
    if evaluation is not None:
        report["evaluation"] = evaluation
    storage.write_json(cfg.layout().report(), report)
    log(f"[plad-ray] report -> {cfg.layout().report()}; summary -> {write_summary(report, cfg.output_dir)}")
    return report
