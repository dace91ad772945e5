"""The objective registry (plad_ray.objectives): each train.loss.type's properties, the NLL rule they settle,
and that no other module decides by a loss type's name."""

import re
from pathlib import Path

import pytest
import torch

from plad_ray.config import Config, LossConfig, load_config
from plad_ray.errors import ConfigError
from plad_ray.losses import Sequences, plad_loss
from plad_ray.model_card import model_card
from plad_ray.objectives import LOSS_TYPES, OBJECTIVES, objective
from plad_ray.train.prepare import trained_statuses

ROOT = Path(__file__).resolve().parents[2]
PACKAGE, CONFIG = ROOT / "plad_ray", ROOT / "configs" / "tiny-cpu.yaml"


def test_the_registry_holds_every_type_with_its_properties():
    assert LOSS_TYPES == (
        "hinge",
        "margin",
        "logistic",
        "listwise",
        "dpo",
        "seqkd",
        "token_kd",
        "onpolicy_kd",
        "contrastive",
    )
    assert [n for n, o in OBJECTIVES.items() if o.trains_ranking] == ["hinge", "margin", "logistic", "listwise", "dpo"]
    assert [n for n, o in OBJECTIVES.items() if o.per_token] == ["seqkd", "token_kd", "onpolicy_kd", "contrastive"]
    assert [n for n, o in OBJECTIVES.items() if o.reads_topk] == ["onpolicy_kd", "contrastive"]
    assert (
        objective("onpolicy_kd").topk_sides == ("rejected",) and objective("onpolicy_kd").topk_tokens_side == "rejected"
    )
    assert objective("contrastive").topk_sides == ("chosen", "rejected")
    assert [n for n, o in OBJECTIVES.items() if o.needs_local_teacher] == ["token_kd"]
    assert [n for n, o in OBJECTIVES.items() if o.groups_samples] == ["listwise"]
    assert [n for n, o in OBJECTIVES.items() if o.needs_scores] == ["margin"]
    assert [n for n, o in OBJECTIVES.items() if o.needs_reference] == ["dpo"]
    assert objective("dpo").scale_key == "beta"  # DPO's beta is train.loss.beta
    with pytest.raises(ValueError, match="loss type 'ipo': expected one of hinge, margin"):
        objective("ipo")
    with pytest.raises(ConfigError, match="config key train.loss.type: must be one of: hinge, margin, logistic"):
        load_config(str(CONFIG), ["train.loss.type=ipo"])


@pytest.mark.parametrize("name", LOSS_TYPES)
def test_nll_weight_trains_the_nll_only_beside_a_ranking_loss(name):
    """One rule, read by the pair counts, the loss and the held-out scoring alike: seqkd trains the NLL; a
    ranking objective trains it at nll_weight > 0; the other per-token objectives train their own term, and
    nll_weight does not apply to them (before, the pair preparation counted onpolicy_kd and contrastive as
    training the NLL at the default weight 1, while the loss ignored it)."""
    o = objective(name)
    assert o.trains_nll(1.0) == (name in ("hinge", "margin", "logistic", "listwise", "dpo", "seqkd"))
    assert o.trains_nll(0.0) == (name == "seqkd")
    # Identical pairs (no ranking signal) train wherever an NLL or per-token term does, at any weight.
    for weight in (0.0, 1.0):
        cfg = Config(output_dir="/runs/x")
        cfg.train.loss.type, cfg.train.loss.nll_weight = name, weight
        keeps = o.per_token or (o.trains_ranking and weight > 0)
        assert trained_statuses(cfg.train) == (("ok", "identical") if keeps else ("ok",)), (name, weight)

    # The loss: nll_weight changes a ranking objective's loss and no per-token objective's.
    torch.manual_seed(0)
    chosen, rejected = torch.randn(4), torch.randn(4)
    tokens = torch.tensor([3.0, 4.0, 5.0, 6.0])
    scores = (torch.randn(4), torch.randn(4)) if o.needs_scores else (None, None)
    refs = (torch.randn(4), torch.randn(4)) if o.needs_reference else (None, None)
    sides = Sequences(chosen, tokens, scores[0], refs[0]), Sequences(rejected, tokens, scores[1], refs[1])
    kd = torch.tensor(0.7) if o.per_token and name != "seqkd" else None
    loss = {
        w: plad_loss(*sides, LossConfig(type=name, beta=0.5, nll_weight=w), token_kd=kd)["loss"] for w in (0.0, 1.0)
    }
    assert torch.equal(loss[0.0], loss[1.0]) == (not o.trains_ranking), (name, loss)
    if kd is not None:
        assert loss[1.0].item() == pytest.approx(0.7)


def test_the_card_says_what_a_per_token_objective_trains():
    cfg = Config(output_dir="/runs/x")
    cfg.train.loss.type, cfg.train.loss.nll_weight = "onpolicy_kd", 1.0
    card = model_card(cfg.to_safe_dict(), {"steps": 1, "counts": {}, "evaluation": None}, ["plad-ray"])
    assert "| objective | onpolicy_kd (divergence to the teacher's top-k on the student's samples) |" in card
    assert "NLL" not in card.split("| objective |")[1].splitlines()[0]  # before: "plus 1.0 x NLL", never trained


def test_no_module_decides_by_a_loss_types_name():
    names = "|".join(LOSS_TYPES)
    decision = re.compile(rf"""(==|!=|\bin)\s*\(?[^)\n]*["']({names})["']""")
    found = [
        f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "objectives.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if decision.search(line) and not line.lstrip().startswith(("#", '"', "raise", 'f"', "for "))
    ]
    assert not found, "\n".join(found)
