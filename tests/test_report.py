"""The human-readable run summary (plad_ray.report) shows the figures of report.json."""

from plad_ray.report import markdown, summary_lines, write_summary

REPORT = {
    "curve": [{"step": 2, "loss": 3.25, "accuracy": 0.5}, {"step": 4, "loss": 1.5, "accuracy": 0.75}],
    "steps": 4, "checkpoint": "/runs/x/student", "train_seconds": 12.5,
    "eval_initial": {"ranking_accuracy": 0.4, "loss": 3.0, "margin": -1.0, "pairs": 10},
    "eval_trained": {"ranking_accuracy": 0.8, "loss": 1.0, "margin": 2.0, "pairs": 10},
    "counts": {"pairs": 24, "train": 12, "heldout": 10, "dropped_identical": 2, "dropped_too_long": 0},
    "generation": {"prompts": 12, "prompts_quarantined": 1, "teacher_generated": 12, "teacher_cached": 0},
}


def test_terminal_lines():
    assert summary_lines(REPORT).splitlines() == [
        "pairs made:          24 (12 train, 10 held out, 2 identical dropped)",
        "training loss:       3.2500 -> 1.5000 over 4 steps",
        "ranking accuracy:    0.400 -> 0.800 on 10 held-out pairs",
        "held-out loss:       3.0000 -> 1.0000",
        "student checkpoint:  /runs/x/student",
    ]


def test_markdown_and_png(tmp_path):
    text = markdown(REPORT, "loss_curve.png")
    assert "| ranking accuracy | 0.4 | 0.8 |" in text
    assert "| prompts set aside (quarantine/) | 1 |" in text
    assert "![training loss and ranking accuracy](loss_curve.png)" in text
    write_summary(REPORT, str(tmp_path))
    assert (tmp_path / "summary.md").read_text() == text
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
