"""The human-readable run summary (plad_ray.summary): task quality first, proxies after, warnings honest."""

import copy

from plad_ray.summary import markdown, summary_lines, write_summary

EVALUATION = {
    "models": {
        "teacher (cached outputs)": {"prompts": 20, "exact_match": 1.0, "rouge_l": 1.0},
        "initial student": {
            "prompts": 20,
            "exact_match": 0.25,
            "rouge_l": 0.25,
            "ece": 0.3,
            "calibration_note": None,
            "vs_teacher": {"win_rate": 0.125},
        },
        "trained student": {
            "prompts": 20,
            "exact_match": 0.4,
            "rouge_l": 0.45,
            "ece": 0.2,
            "calibration_note": None,
            "vs_teacher": {"win_rate": 0.2},
            "vs_initial": {"win_rate": 0.6},
        },
    }
}
REPORT = {
    "curve": [{"step": 2, "loss": 3.25, "accuracy": 0.5}, {"step": 4, "loss": 1.5, "accuracy": 0.75}],
    "steps": 4,
    "checkpoint": "/runs/x/student",
    "train_seconds": 12.5,
    "eval_initial": {
        "ranking_accuracy": 0.4,
        "loss": 3.0,
        "margin": -1.0,
        "pairs": 10,
        "ranked_pairs": 8,
        "chosen_nll_per_token": 1.5,
    },
    "eval_trained": {
        "ranking_accuracy": 0.8,
        "loss": 1.0,
        "margin": 2.0,
        "pairs": 10,
        "ranked_pairs": 8,
        "chosen_nll_per_token": 1.25,
    },
    "evals": [{"step": 2, "teacher_logp_per_token": -1.4, "ranking_accuracy": 0.6, "chosen_nll_per_token": 1.4}],
    "counts": {"pairs": 24, "train": 12, "heldout": 10, "dropped_identical": 2, "dropped_too_long": 0},
    "generation": {"prompts": 12, "prompts_quarantined": 1, "teacher_generated": 12, "teacher_cached": 0},
    "evaluation": EVALUATION,
}


def test_terminal_summary_leads_with_task_quality_and_keeps_proxies_after():
    lines = summary_lines(REPORT).splitlines()
    assert lines[0] == "verdict: the trained student is better at the task: held-out exact match 0.250 -> 0.400"
    assert lines[1] == "task quality on 20 held-out prompts (greedy):"
    assert lines[2].split() == ["initial", "trained", "teacher"]
    assert lines[3].split() == ["exact", "match", "0.250", "0.400", "1.000"]
    assert lines[4].split() == ["ROUGE-L", "0.250", "0.450", "1.000"]
    assert lines[5].split() == ["win", "rate", "vs", "teacher", "0.125", "0.200", "-"]
    assert lines[6].split() == ["win", "rate", "vs", "initial", "-", "0.600", "-"]
    assert lines[7].startswith("teacher-output NLL/token: 1.500 -> 1.250 on 10 held-out pairs")
    assert lines[8:11] == [
        "proxies (not task quality):",
        "  ranking accuracy:    0.400 -> 0.800 on 8 held-out pairs",
        "  ECE:                 0.300 -> 0.200",
    ]
    assert lines[-3:] == [
        "pairs made:          24 (12 train, 10 held out, 2 identical dropped)",
        "training loss:       3.2500 -> 1.5000 over 4 steps",
        "student checkpoint:  /runs/x/student",
    ]
    assert not any("WARNING" in line for line in lines)


def test_a_worse_student_is_called_worse_whatever_the_proxies_say():
    report = copy.deepcopy(REPORT)
    report["evaluation"]["models"]["trained student"]["exact_match"] = 0.2
    report["eval_trained"]["chosen_nll_per_token"] = 3.8
    report["evaluation"]["models"]["trained student"]["calibration_note"] = "uninformative: no output is correct, ..."
    lines = summary_lines(report).splitlines()
    assert lines[0].startswith(
        "WARNING: the trained student is not better at the task: held-out exact match 0.250 -> 0.200"
    )
    assert lines[1] == (
        "WARNING: the student became less likely to write the teacher's held-out outputs (NLL/token 1.500 -> 3.800)"
    )
    assert "ranking accuracy:    0.400 -> 0.800" in "\n".join(lines)  # still shown, after, as a proxy
    assert "trained student: uninformative: no output is correct" in "\n".join(lines)
    report["guard"] = {
        "step": 2,
        "initial_logp_per_token": -1.5,
        "logp_per_token": -1.7,
        "max_logp_drop": 0.1,
        "action": "stop",
        "stopped_at_step": 2,
        "restored_step": 0,
    }
    assert (
        "WARNING: collapse guard tripped at step 2: held-out teacher-output log-prob/token -1.500 -> -1.700 "
        "(limit 0.1); training stopped at step 2; the exported student is step 0's"
    ) in summary_lines(report)


def test_without_an_evaluation_the_summary_says_so():
    report = {k: v for k, v in REPORT.items() if k != "evaluation"}
    assert summary_lines(report).splitlines()[0].startswith("task quality: not evaluated")


def test_markdown_and_png(tmp_path):
    text = markdown(REPORT, "loss_curve.png")
    assert text.index("## Task quality") < text.index("## Did the student keep") < text.index("## Proxies")
    assert "| exact match | 0.250 | 0.400 | 1.000 |" in text
    assert "| 2 | -1.4 | 0.6 |" in text  # the held-out evaluation during training
    assert "| ranking accuracy | 0.4 | 0.8 |" in text
    assert "| prompts set aside (quarantine/prompts/) | 1 |" in text
    write_summary(REPORT, str(tmp_path))
    assert (tmp_path / "summary.md").read_text() == text
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_gives_a_black_box_teachers_account():
    endpoint = {
        "requests": 52,
        "retries": 4,
        "polls": 7,
        "throttled": 3,
        "throttle_wait_s": 3.0,
        "outage_s": 61.4,
        "refused": 2,
        "prompt_tokens": 296,
        "completion_tokens": 290,
    }
    report = copy.deepcopy(REPORT)
    report["generation"]["teacher_endpoint"] = endpoint
    text = markdown(report, "loss_curve.png")
    assert "| teacher endpoint: requests / retries / throttled | 52 / 4 / 3 |" in text
    assert "| teacher endpoint: seconds throttled / down | 3 / 61.4 |" in text
    assert "| teacher endpoint: usage prompt / completion tokens | 296 / 290 |" in text
    assert "| teacher endpoint: prompts refused (quarantine/teacher/) | 2 |" in text
    assert "teacher endpoint" not in markdown(REPORT, "loss_curve.png")  # a vLLM teacher: no such rows
    # A report from before the figures of failed prompts and canaries: "-", not 0.
    assert "| teacher endpoint: prompts failed while it answered others (quarantine/teacher/) | - |" in text
    report["generation"]["teacher_endpoint"] = {**endpoint, "failed": 1, "canaries": 2}
    text = markdown(report, "loss_curve.png")
    assert "| teacher endpoint: prompts failed while it answered others (quarantine/teacher/) | 1 |" in text
    assert "| teacher endpoint: canaries (answered requests sent again: does it answer others?) | 2 |" in text


def test_markdown_gives_each_rounds_teacher_scoring():
    scoring = {
        "scored_now": 3072,
        "scored_sequences": 3072,
        "scoring_prefill_tokens": 39930,
        "scored_tokens": 19815,
        "scoring_seconds": 64.6,
        "scores_bytes": 2135113,
        "scores_bytes_per_token": 107.75,
        "score_top_k": 20,
    }
    report = copy.deepcopy(REPORT)
    report["rounds"] = [
        {"round": 1, "pair_generation": {"teacher_scoring": scoring}},
        {"round": 2, "pair_generation": {"teacher_scoring": {"scored_now": 0, "scored_sequences": 3072}}},
    ]
    text = markdown(report, "loss_curve.png")
    assert (
        "| round 1 teacher scoring: sequences scored now / in all, prefill tokens, seconds | 3072 / 3072, 39930, 64.6 |"
        in text
    )
    assert "| round 1 teacher scores on disk: bytes per scored token (top 20) | 107.8 |" in text
    # a round whose scores were all on disk already: nothing prefilled, no new size
    assert (
        "| round 2 teacher scoring: sequences scored now / in all, prefill tokens, seconds | 0 / 3072, 0, - |" in text
    )
    assert "round 2 teacher scores on disk" not in text
    assert "teacher scoring" not in markdown(REPORT, "loss_curve.png")
