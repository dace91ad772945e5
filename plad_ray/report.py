"""The run's summary for people: a few terminal lines, summary.md and loss_curve.png.

report.json (written by the pipeline) is the machine-readable record; this module only
presents it.
"""

import io

from plad_ray.data import storage

NAN = float("nan")


def summary_lines(report: dict) -> str:
    """Pairs, loss start -> end, ranking accuracy before -> after, where the checkpoint is."""
    curve = report.get("curve") or [{}]
    counts = report.get("counts", {})
    before, after = report.get("eval_initial", {}), report.get("eval_trained", {})
    return "\n".join([
        f"pairs made:          {counts.get('pairs', '?')} ({counts.get('train', '?')} train, "
        f"{counts.get('heldout', '?')} held out, {counts.get('dropped_identical', 0)} identical dropped)",
        f"training loss:       {curve[0].get('loss', NAN):.4f} -> {curve[-1].get('loss', NAN):.4f} "
        f"over {report.get('steps', '?')} steps",
        f"ranking accuracy:    {before.get('ranking_accuracy', NAN):.3f} -> "
        f"{after.get('ranking_accuracy', NAN):.3f} on {after.get('pairs', '?')} held-out pairs",
        f"held-out loss:       {before.get('loss', NAN):.4f} -> {after.get('loss', NAN):.4f}",
        f"student checkpoint:  {report.get('checkpoint', '?')}",
    ])


def markdown(report: dict, plot_name: str) -> str:
    g, c = report.get("generation", {}), report.get("counts", {})
    before, after = report.get("eval_initial", {}), report.get("eval_trained", {})
    rows = [("pairs", c.get("pairs")), ("training pairs", c.get("train")), ("held-out pairs", c.get("heldout")),
            ("identical pairs dropped", c.get("dropped_identical")),
            ("pairs over train.max_length dropped", (c.get("dropped_too_long") or 0)),
            ("teacher wins / ties / student wins (scorer)",
             f"{c['teacher_wins']} / {c['ties']} / {c['student_wins']}" if "teacher_wins" in c else "- (no scorer)"),
            ("student-won pairs dropped / flipped",
             f"{c.get('dropped_student_better', 0)} / {c.get('flipped_student_better', 0)}"),
            ("prompts", g.get("prompts")), ("prompts set aside (quarantine/)", g.get("prompts_quarantined")),
            ("prompts truncated", g.get("prompts_truncated")),
            ("teacher outputs generated / cached", f"{g.get('teacher_generated', '-')} / {g.get('teacher_cached', '-')}"),
            ("teacher tokens, seconds", f"{g.get('teacher_tokens', '-')}, {_num(g.get('teacher_seconds'))}"),
            ("student tokens, seconds", f"{g.get('student_tokens', '-')}, {_num(g.get('student_seconds'))}"),
            ("optimizer steps, training seconds", f"{report.get('steps')}, {_num(report.get('train_seconds'))}")]
    lines = ["# plad-ray run summary", "", f"Trained student: `{report.get('checkpoint')}`", "",
             "| held-out pairs | before training | after training |", "|---|---|---|"]
    for key in ("ranking_accuracy", "loss", "margin", "chosen_nll_per_token"):
        lines.append(f"| {key.replace('_', ' ')} | {_num(before.get(key))} | {_num(after.get(key))} |")
    lines += ["", "| run | |", "|---|---|"] + [f"| {k} | {v if v is not None else '-'} |" for k, v in rows]
    lines += ["", f"![training loss and ranking accuracy]({plot_name})", ""]
    return "\n".join(lines)


def _num(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"


def loss_curve_png(report: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report.get("curve") or []
    steps = [c["step"] for c in curve]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(steps, [c["loss"] for c in curve], marker=".", label="training loss")
    left.set_xlabel("optimizer step")
    left.set_ylabel("PLaD loss")
    right.plot(steps, [c["accuracy"] for c in curve], marker=".", label="training pairs (window)")
    for key, step, style in (("eval_initial", 0, "o"), ("eval_trained", report.get("steps", 0), "s")):
        if report.get(key):
            right.plot([step], [report[key]["ranking_accuracy"]], style, label=f"held-out ({key[5:]})")
    right.set_xlabel("optimizer step")
    right.set_ylabel("ranking accuracy")
    right.set_ylim(0, 1.02)
    right.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_summary(report: dict, output_dir: str) -> str:
    """Write summary.md and loss_curve.png beside report.json; returns the Markdown's URI."""
    storage.write_bytes(storage.join(output_dir, "loss_curve.png"), loss_curve_png(report))
    uri = storage.join(output_dir, "summary.md")
    storage.write_text(uri, markdown(report, "loss_curve.png"))
    return uri
