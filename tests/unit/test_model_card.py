"""The exported student's model card (plad_ray.model_card): teacher, data, objective, evaluation, command."""

from plad_ray.config import Config
from plad_ray.model_card import model_card

REPORT = {
    "steps": 54,
    "counts": {"pairs": 2048, "train": 1744, "heldout": 304},
    "generation": {"prompts": 1024},
    "eval_initial": {"chosen_nll_per_token": 0.516},
    "eval_trained": {"chosen_nll_per_token": 0.402, "pairs": 304},
    "evaluation": {
        "models": {
            "initial student": {"prompts": 152, "exact_match": 0.296},
            "trained student": {"prompts": 152, "exact_match": 0.388},
            "teacher (cached outputs)": {"prompts": 152, "exact_match": 1.0},
        }
    },
}


def config(**loss) -> dict:
    cfg = Config(output_dir="/runs/x")
    cfg.data.prompts, cfg.teacher.model, cfg.student.model = "/data/p.jsonl", "tiny:teacher", "tiny:student"
    for key, value in loss.items():
        setattr(cfg.train.loss, key, value)
    return cfg.to_safe_dict()


def test_card_names_teacher_data_objective_evaluation_and_command():
    card = model_card(
        config(type="hinge", beta=0.5, length_normalize=True, nll_weight=1.0),
        REPORT,
        ["plad-ray", "distill", "--config", "configs/tiny-cpu.yaml", "--set", "train.seed=3 4"],
    )
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "| teacher | `tiny:teacher` |" in card and "| student (before distillation) | `tiny:student` |" in card
    assert "| prompts | `/data/p.jsonl`: 1024 used, held-out fraction 0.1 |" in card
    assert "| pairs | 2048 (1744 trained on, 304 held out) |" in card
    assert (
        "| objective | hinge, beta 0.5, length-normalised log-probs, plus 1.0 x NLL of the teacher's outputs |" in card
    )
    assert "## Evaluation on 152 held-out prompts (greedy)" in card
    assert "| | initial student | trained student | teacher (cached outputs) |" in card
    assert "| exact match | 0.296 | 0.388 | 1.000 |" in card
    assert "0.516 before training, 0.402 after" in card
    assert "plad-ray distill --config configs/tiny-cpu.yaml --set 'train.seed=3 4'" in card


def test_card_without_evaluation_says_so_and_seqkd_reads_plainly():
    card = model_card(config(type="seqkd"), {**REPORT, "evaluation": None}, ["python", "-m", "jobs.train"])
    assert "| objective | seqkd (NLL of the teacher's outputs) |" in card
    assert "No generation evaluation ran with this run" in card and "python -m jobs.train" in card


def test_report_keeps_the_command_for_a_later_card(tmp_path):
    """write_report records the command line; `plad-ray evaluate` rewrites the card from report.json with it."""
    import json

    from plad_ray.model_card import write_card
    from plad_ray.summary import write_report

    cfg = Config(output_dir=str(tmp_path))
    cfg.data.prompts, cfg.teacher.model, cfg.student.model = "/data/p.jsonl", "tiny:teacher", "tiny:student"
    made = ["plad-ray", "distill", "--config", "c.yaml"]
    held_out = {"chosen_nll_per_token": 0.4, "ranking_accuracy": 0.8, "pairs": 304}
    round_1 = {**REPORT, "eval_initial": held_out, "eval_trained": held_out, "curve": [], "evals": []}
    write_report(cfg, [round_1], log=lambda _: None, command=made)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["command"] == made
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "_manifest.json").write_text("{}")
    card = write_card(cfg, report, report["command"])
    assert "plad-ray distill --config c.yaml" in (tmp_path / "student" / "README.md").read_text() and card
