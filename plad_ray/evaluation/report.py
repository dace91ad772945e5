"""eval/summary.md and eval/reliability.png from the evaluation figures (presentation only)."""

import io

COLUMNS = (("verifier_accuracy", "verifier accuracy"), ("exact_match", "exact match"), ("rouge_l", "ROUGE-L"),
           ("win_rate", "win rate vs teacher"), ("ece", "ECE"), ("mean_confidence", "mean confidence"),
           ("mean_tokens", "mean tokens"))


def _cell(m: dict, key: str) -> str:
    value = m.get("vs_teacher", {}).get("win_rate") if key == "win_rate" else m.get(key)
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def markdown(report: dict, plot_name: str) -> str:
    models = report["models"]
    first = next(iter(models.values()))
    lines = ["# plad-ray evaluation", "",
             f"{first['prompts']} held-out prompts, greedy generation; scorer: {report['scorer'] or 'none'}. "
             "Win rate counts ties as half. ECE: confidence exp(mean token log-prob) of the model's own output "
             "against correctness (verifier, else exact match).", "",
             "| model | " + " | ".join(name for _, name in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for name, m in models.items():
        lines.append(f"| {name} | " + " | ".join(_cell(m, key) for key, _ in COLUMNS) + " |")
    lines += ["", f"![reliability diagram]({plot_name})", ""]
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
        ax.bar([b["lower"] for b in used], [b["accuracy"] for b in used], width=width, align="edge",
               edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        for b in used:
            ax.annotate(str(b["count"]), (b["lower"] + width / 2, b["accuracy"]), ha="center", va="bottom", fontsize=7)
        ax.set_title(f"{name}\nECE {m['ece']:.3f}", fontsize=9)
        ax.set_xlabel("confidence exp(mean token log-prob)")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
