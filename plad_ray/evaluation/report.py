"""eval/summary.md and eval/reliability.png from the evaluation figures (presentation only)."""

import io

QUALITY = (
    ("verifier_accuracy", "verifier accuracy"),
    ("exact_match", "exact match"),
    ("graded_score", "graded score"),
    ("rouge_l", "ROUGE-L"),
    ("vs_teacher", "win rate vs teacher"),
    ("vs_initial", "win rate vs initial"),
    ("sampled_accuracy", "sampled accuracy"),
    ("best_of_n_accuracy", "best-of-n accuracy"),
    ("mean_tokens", "mean tokens"),
)
CALIBRATION = (("ece", "ECE"), ("auroc", "AUROC"), ("mean_confidence", "mean confidence"))


def _cell(m: dict, key: str) -> str:
    value = m.get(key)
    value = value.get("win_rate") if isinstance(value, dict) else value
    return f"{value:.3f}" if isinstance(value, (int, float)) and value == value else "-"


def _table(models: dict, columns) -> list[str]:
    used = [(k, n) for k, n in columns if any(_cell(m, k) != "-" for m in models.values())]
    lines = ["| model | " + " | ".join(name for _, name in used) + " |", "|---|" + "---|" * len(used)]
    return lines + [f"| {name} | " + " | ".join(_cell(m, k) for k, _ in used) + " |" for name, m in models.items()]


def markdown(report: dict, plot_name: str) -> str:
    models = report["models"]
    first = next(iter(models.values()))
    samples = next((m["num_samples"] for m in models.values() if m.get("num_samples")), 0)
    lines = [
        "# plad-ray evaluation",
        "",
        f"{first['prompts']} held-out prompts, greedy generation; scorer: {report['scorer'] or 'none'}"
        + (f", graded scorer: {report['graded_scorer']}" if report.get("graded_scorer") else "")
        + ". "
        "Win rates count ties as half."
        + (
            f" Sampled accuracy: the mean over {samples} samples at T=1; best-of-{samples}: the sample with the "
            "highest mean token log-prob."
            if samples
            else ""
        ),
        "",
        "## Task quality",
        "",
    ] + _table(models, QUALITY)
    students = {n: m for n, m in models.items() if "mean_confidence" in m}
    lines += [
        "",
        "## Calibration (a proxy)",
        "",
        "Confidence: exp(mean token log-prob) of the model's own greedy output, against correctness (verifier, "
        "else exact match). ECE falls when a model grows less sure of wrong answers, so it means little where "
        "(almost) no output is correct.",
        "",
    ] + _table(students, CALIBRATION)
    notes = [
        f"- {name}: ECE and AUROC are {m['calibration_note']}"
        for name, m in students.items()
        if m.get("calibration_note")
    ]
    lines += ([""] + notes if notes else []) + ["", f"![reliability diagram]({plot_name})", ""]
    return "\n".join(lines)


def reliability_png(models: dict) -> bytes:
    """One panel per model with calibration figures: accuracy per confidence bin against the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calibrated = {name: m for name, m in models.items() if m.get("reliability")}
    fig, axes = plt.subplots(1, max(len(calibrated), 1), figsize=(4 * max(len(calibrated), 1), 4), squeeze=False)
    for ax, (name, m) in zip(axes[0], calibrated.items()):
        bins = m["reliability"]
        width = bins[0]["upper"] - bins[0]["lower"]
        used = [b for b in bins if b["count"]]
        ax.bar(
            [b["lower"] for b in used],
            [b["accuracy"] for b in used],
            width=width,
            align="edge",
            edgecolor="black",
            alpha=0.7,
            label="accuracy",
        )
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        for b in used:  # outputs in the bin / correct ones: a bin with none correct says nothing about calibration
            right = round(b["accuracy"] * b["count"])
            ax.annotate(
                f"{b['count']}" + ("\n0 correct" if right == 0 else f"/{right}"),
                (b["lower"] + width / 2, b["accuracy"]),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        note = (
            "\n(uninformative: " + m["calibration_note"].split(": ", 1)[1].split(",")[0] + ")"
            if m.get("calibration_note")
            else ""
        )
        ax.set_title(f"{name}\nECE {m['ece']:.3f}{note}", fontsize=9)
        ax.set_xlabel("confidence exp(mean token log-prob)")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.legend(loc="upper left", fontsize=7)
    return png_bytes(fig)


def png_bytes(fig) -> bytes:
    """A matplotlib figure as PNG bytes (laid out, 100 dpi); the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
