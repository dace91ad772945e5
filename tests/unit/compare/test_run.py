"""compare's order of work with the trainer and the vLLM scoring replaced by a table of dev/test outcomes: which
arms train, which candidate and rate the dev prompts choose, and that only the choice trains the other seeds. The
real trainer and engines run in tests/integration/test_pipeline_e2e.py (compare at smoke size)."""

import json
import re

import pytest

from plad_ray.compare import plan, run
from plad_ray.config import load_config

ROWS = [{"id": f"p{i}", "prompt": f"q{i}", "reference": "a"} for i in range(200)]
DEV = {r["id"] for r in ROWS if plan.is_dev(r["id"])}


def _accuracy(folder: str) -> float:
    """What an arm scores, by its folder: beta 0.5 beats 0.1; lr 1e-4 is best; seeds and data orders differ a little."""
    beta = 0.5 if "beta-0.5" in folder else 0.1 if "beta-0.1" in folder else 0.3
    lr = float(re.search(r"-lr([0-9.e-]+)-seed", folder).group(1))
    seed = int(re.search(r"-seed(\d+)", folder).group(1))
    return beta + (0.3 if lr == 1e-4 else 0.1) + 0.01 * (seed % 7)


@pytest.fixture
def trained(monkeypatch, tmp_path):
    folders = []

    def train(cfg, log):
        folders.append(cfg.output_dir)
        return {"steps": 3, "eval_initial": {"ranking_accuracy": 0.5}, "eval_trained": {"ranking_accuracy": 0.6}}

    def evaluator(base_cfg, rows):
        def evaluate(model_path):
            share = 0.0 if model_path == "initial" else _accuracy(model_path)
            # the first `share` of the prompts correct, in dev and in test alike
            return [
                {"id": r["id"], "text": "a", "correct": float((i % 100) < share * 100), "best_of_n": float(i % 2)}
                for i, r in enumerate(rows)
            ]

        return evaluate

    monkeypatch.setattr(run, "_pairs", lambda base_cfg, configs, log: (ROWS, []))
    monkeypatch.setattr(run, "_evaluator", evaluator)
    monkeypatch.setattr(run, "_student", lambda cfg: "initial")
    monkeypatch.setattr(run.pipeline, "train", train)
    return folders


def _compare(out, spec: str, lines: list):
    load = lambda more: load_config("configs/tiny-cpu.yaml", [f"output_dir={out}-unused", *more])  # noqa: E731
    return run.compare(load, plan.parse_objectives(spec), [3e-5, 1e-4, 3e-4], 2, str(out), 0, log=lines.append)


def test_a_tuned_objective_trains_every_candidate_on_dev_then_only_its_choice(trained, tmp_path):
    lines = []
    result = _compare(tmp_path / "c", "seqkd,hinge[beta=0.1|0.5;nll_weight=1]", lines)
    tuned = "hinge[beta=0.1|0.5;nll_weight=1]"
    assert result["setting"] == {"seqkd": "seqkd", tuned: "hinge[beta=0.5;nll_weight=1]"}
    assert result["chosen"] == {"seqkd": 1e-4, tuned: 1e-4}
    assert set(result["dev"]) == {"seqkd", "hinge[beta=0.1;nll_weight=1]", "hinge[beta=0.5;nll_weight=1]"}
    assert result["dev"]["hinge[beta=0.1;nll_weight=1]"]["0.0001"] == pytest.approx(
        plan.mean_of(run._evaluator(None, ROWS)(str(tmp_path / "x-beta-0.1-lr0.0001-seed0")), DEV)
    )
    # seed 0: 3 rates x (seqkd + 2 candidates) = 9; seed 1: seqkd and the chosen candidate; the A/A: 2 seeds
    names = [f.rsplit("/", 1)[-1] for f in trained]
    assert len(names) == 13
    assert sum("beta-0.1" in n for n in names) == 3 and sum("beta-0.5" in n for n in names) == 4
    assert sum(n.endswith("-seed1000") or n.endswith("-seed1001") for n in names) == 2
    assert f"[compare] {tuned}: hinge[beta=0.5;nll_weight=1] at lr 0.0001 chosen on dev" in lines
    # the chosen candidate's test records are the objective's; the table says what was chosen
    assert result["arms"][tuned]["per_seed"] == pytest.approx([0.8, 0.81], abs=0.011)
    ci = result["arms"][tuned]["vs_default"]
    assert (
        ci["mean"] == pytest.approx(0.2, abs=0.03) and ci["seeds"] == 2 and result["arms"][tuned]["verdict"] == "better"
    )
    # best-of-n's difference is reported beside the verdict: here every model's best-of-n is the same, 0 apart
    assert result["arms"][tuned]["best_of_n_vs_default"]["mean"] == 0.0
    assert "best_of_n_vs_default" not in result["arms"]["seqkd"]
    assert f"| {tuned} → hinge[beta=0.5;nll_weight=1] | 0.0001 |" in (tmp_path / "c" / "compare.md").read_text()
    assert json.loads((tmp_path / "c" / "compare.json").read_text())["setting"] == result["setting"]

    again = []  # the same command resumes: nothing trains
    trained.clear()
    assert _compare(tmp_path / "c", "seqkd,hinge[beta=0.1|0.5;nll_weight=1]", again)["arms"] == result["arms"]
    assert trained == [] and "[compare] resuming the comparison in " + str(tmp_path / "c") in again
