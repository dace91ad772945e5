"""plad-ray compare's decisions: objectives from the command line, the dev/test split, the widening grid search,
per-prompt scores."""

import math

import pytest

from plad_ray.compare import plan
from plad_ray.config import load_config
from plad_ray.errors import ConfigError


def test_objectives_are_loss_types_with_their_keys_and_the_first_is_the_default():
    objectives = plan.parse_objectives("seqkd, hinge[beta=0.5;nll_weight=1], seqkd[train.micro_batch_size=4]")
    assert [o.name for o in objectives] == ["seqkd", "hinge[beta=0.5;nll_weight=1]", "seqkd[train.micro_batch_size=4]"]
    assert objectives[0].overrides == ("train.loss.type=seqkd",)
    assert objectives[1].overrides == ("train.loss.type=hinge", "train.loss.beta=0.5", "train.loss.nll_weight=1")
    assert objectives[2].overrides == ("train.loss.type=seqkd", "train.micro_batch_size=4")
    assert len({o.slug for o in objectives}) == 3  # every arm its own folder
    # the overrides are real config keys
    cfg = load_config("configs/tiny-cpu.yaml", list(objectives[1].overrides))
    assert (cfg.train.loss.type, cfg.train.loss.beta, cfg.train.loss.nll_weight) == ("hinge", 0.5, 1.0)


def test_alternatives_are_candidates_tuned_on_dev_each_a_full_setting():
    default, tuned = plan.parse_objectives("seqkd,hinge[beta=0.1|0.5;length_normalize=true;nll_weight=1|5]")
    assert default.choices == (default,) and not default.candidates
    assert tuned.name == "hinge[beta=0.1|0.5;length_normalize=true;nll_weight=1|5]"
    assert [c.name for c in tuned.choices] == [
        "hinge[beta=0.1;length_normalize=true;nll_weight=1]",
        "hinge[beta=0.1;length_normalize=true;nll_weight=5]",
        "hinge[beta=0.5;length_normalize=true;nll_weight=1]",
        "hinge[beta=0.5;length_normalize=true;nll_weight=5]",
    ]
    assert tuned.choices[3].overrides == (
        "train.loss.type=hinge",
        "train.loss.beta=0.5",
        "train.loss.length_normalize=true",
        "train.loss.nll_weight=5",
    )
    assert len({c.slug for c in tuned.choices}) == 4  # every candidate's arms their own folders
    # a candidate is the same objective, and the same arms, as when it is listed alone
    alone = plan.parse_objectives("seqkd,hinge[beta=0.5;length_normalize=true;nll_weight=5]")[1]
    assert (alone.name, alone.overrides) == (tuned.choices[3].name, tuned.choices[3].overrides)


def test_the_best_candidate_is_the_one_whose_best_rate_scores_highest_the_first_on_a_tie():
    curves = {"a": {1e-4: 0.30, 3e-4: 0.40}, "b": {1e-4: 0.45, 3e-4: 0.20}, "c": {1e-4: 0.45}}
    assert plan.best_candidate(curves) == "b"
    assert plan.best_candidate({"a": {1e-4: 0.5}}) == "a"


@pytest.mark.parametrize(
    "spec, says",
    [
        ("seqkd", "at least two"),
        ("seqkd,seqkd", "listed twice"),
        ("seqkd,hinge[beta]", "not key=value"),
        ("seqkd,hinge[beta=1", "not an objective"),
        ("seqkd,,", "at least two"),
        ("seqkd,hinge[beta=0.1|]", "not key=value"),
    ],
)
def test_a_bad_objective_list_is_one_line_naming_it(spec, says):
    with pytest.raises(ConfigError, match=says):
        plan.parse_objectives(spec)


def test_the_grid_defaults_around_the_configs_rate_and_refuses_nonsense():
    assert plan.parse_grid(None, 1e-3) == [0.000333, 0.001, 0.003]
    assert plan.parse_grid("1e-3, 1e-4,1e-3", 5.0) == [1e-4, 1e-3]
    for bad in ("fast", "0", "2"):
        with pytest.raises(ConfigError, match="--grid"):
            plan.parse_grid(bad, 1e-3)


def test_dev_and_test_split_the_held_out_prompts_stably_and_apart_from_the_held_out_split():
    from plad_ray import pairs

    ids = [f"p{i}" for i in range(4000)]
    dev = [i for i in ids if plan.is_dev(i)]
    assert abs(len(dev) / len(ids) - plan.DEV_FRACTION) < 0.03
    assert dev == [i for i in ids if plan.is_dev(i)]  # the same on every call (a hash, not a random draw)
    held = [i for i in ids if pairs.is_heldout(i, 0.15)]
    held_dev = [i for i in held if plan.is_dev(i)]
    assert abs(len(held_dev) / len(held) - plan.DEV_FRACTION) < 0.07  # independent of the held-out split


def test_the_grid_widens_until_the_best_rate_is_inside_it():
    peak = 3e-3
    tried = []

    def dev_scores(rates):  # a dev curve that peaks at 3e-3, outside the grid given
        tried.extend(rates)
        return {lr: -abs(math.log(lr / peak)) for lr in rates}

    dev = plan.search_rate([1e-4, 3e-4], dev_scores)
    assert tried[:2] == [1e-4, 3e-4] and 9e-4 in dev and 0.0027 in dev
    best = max(dev, key=dev.get)
    assert best == 0.0027 and not plan.at_edge(dev)  # an inner point: the widening stopped there
    assert max(dev) == 0.0081  # one step past the best


def test_widening_stops_at_its_cap_and_the_edge_is_reported():
    dev = plan.search_rate(
        [1e-4], lambda rates: {lr: lr for lr in rates}, max_widenings=2
    )  # always better higher: never interior
    assert sorted(dev) == [3.33e-05, 1e-4, 0.0003, 0.0009] and plan.at_edge(dev)  # a grid of one: both sides first
    assert plan.search_rate([1e-3], lambda rates: dict.fromkeys(rates, 1.0), max_widenings=0) == {1e-3: 1.0}


def test_prompt_scores_keep_greedy_and_best_of_n_by_the_models_own_likelihood():
    rows = [{"id": "a", "prompt": "ab>", "reference": "ba"}, {"id": "b", "prompt": "cd>", "reference": "dc"}]
    outputs = [
        {"text": "ba", "samples": [{"text": "ab", "mean_logprob": -0.1}, {"text": "ba", "mean_logprob": -0.5}]},
        {"text": "cd", "samples": [{"text": "cd", "mean_logprob": -0.9}, {"text": "dc", "mean_logprob": -0.2}]},
    ]
    records = plan.prompt_scores(rows, outputs, lambda row, text: float(text == row["reference"]))
    assert [(r["correct"], r["best_of_n"]) for r in records] == [(1.0, 0.0), (0.0, 1.0)]
    assert plan.mean_of(records, {"a", "b"}) == 0.5 and plan.mean_of(records, {"b"}, "best_of_n") == 1.0
    assert plan.scores_by_seed({1: records, 0: records[::-1]}, ["b", "a"]) == [[0.0, 1.0], [0.0, 1.0]]


def test_make_bench_quality_compares_objectives_whose_every_candidate_is_a_valid_config():
    """make bench-quality's --objectives (Makefile QUALITY_OBJECTIVES): every candidate loads on the demo's config,
    so a long benchmark does not stop at its 20th arm on a typo."""
    import re
    from pathlib import Path

    spec = re.search(r"^QUALITY_OBJECTIVES \?= (.+)$", Path("Makefile").read_text(), re.M).group(1)
    objectives = plan.parse_objectives(spec)
    assert objectives[0].name == "seqkd" and [len(o.choices) for o in objectives] == [1, 1, 12, 4]
    for c in (c for o in objectives for c in o.choices):
        cfg = load_config("configs/tiny-cpu.yaml", list(c.overrides))
        assert cfg.train.loss.type == c.name.split("[")[0]
