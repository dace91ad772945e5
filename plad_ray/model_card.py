"""The exported student's model card: `student/README.md`, the Hugging Face convention (YAML metadata,
then Markdown), so the folder can be shared as it is.

It names the teacher, the data, the objective, the run's evaluation table and the command that made
the run; both transformers and vLLM ignore the file when loading. A pure function of the config, the
report and the command line; the caller writes it.
"""

import shlex

from plad_ray.config import Config
from plad_ray.data import storage
from plad_ray.objectives import objective
from plad_ray.summary import quality_table, teacher_nll

CARD = "README.md"


def model_card(config: dict, report: dict, command: list[str]) -> str:
    """The card's text. `config`: Config.to_safe_dict(); `report`: report.json; `command`: the argv."""
    train, loss = config["train"], config["train"]["loss"]
    counts = report.get("counts", {})
    evaluation = report.get("evaluation") or {}
    objective = _objective(loss)
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [distillation, plad, plad-ray]",
        "---",
        "",
        "# Student distilled with plad-ray",
        "",
        "A student model distilled from a teacher with plad-ray (PLaD: preference-based distillation with "
        "pseudo-preference pairs). Loads with `AutoModelForCausalLM.from_pretrained(<this folder>)` and "
        "`vllm.LLM(<this folder>)`.",
        "",
        "| | |",
        "|---|---|",
        f"| student (before distillation) | `{config['student']['model']}` |",
        f"| teacher | `{config['teacher']['model']}`"
        + (f" at {config['teacher']['endpoint']['url']}" if config["teacher"].get("endpoint") else "")
        + " |",
        f"| prompts | `{config['data']['prompts']}`: {report.get('generation', {}).get('prompts', '?')} used, "
        f"held-out fraction {config['data']['heldout_fraction']} |",
        f"| pairs | {counts.get('pairs', '?')} ({counts.get('train', '?')} trained on, "
        f"{counts.get('heldout', '?')} held out) |",
        f"| objective | {objective} |",
        f"| training | {report.get('steps', '?')} steps, {train['num_epochs']} epoch(s), learning rate "
        f"{train['learning_rate']}, ZeRO-{train['zero_stage']}, {train['precision']}, seed {train['seed']} |",
        "",
    ]
    table = quality_table(evaluation, "## Evaluation on {prompts} held-out prompts (greedy)")
    if table:
        lines += table + [""]
    else:
        lines += [
            "## Evaluation",
            "",
            "No generation evaluation ran with this run (eval.enabled was off, or "
            "the job trained only; `plad-ray evaluate` adds it to the run's report).",
            "",
        ]
    nll_before, nll_after, pairs = teacher_nll(report)
    lines += [
        f"Per-token NLL of the {pairs} held-out teacher outputs: {nll_before:.3f} before training, "
        f"{nll_after:.3f} after (lower: the student writes what the teacher wrote more readily).",
        "",
        "## How it was made",
        "",
        "```bash",
        shlex.join(command),
        "```",
        "",
        "The run's full config is `run.json` and its report `report.json` in the run's output folder.",
        "",
    ]
    return "\n".join(lines)


def write_card(cfg: Config, report: dict, command: list[str]) -> str | None:
    """The card of the run's last student, beside its weights; its location (None: no exported student)."""
    student = cfg.layout().student(cfg.train.rounds)
    if storage.manifest(student) is None:
        return None
    uri = storage.join(student, CARD)
    storage.write_text(uri, model_card(cfg.to_safe_dict(), report, command))
    return uri


def _objective(loss: dict) -> str:
    kind = loss["type"]
    if objective(kind).per_token:
        return objective(kind).summary
    scale = objective(kind).scale_key
    parts = [kind, f"{scale} {loss[scale]}"]
    if objective(kind).needs_reference:
        parts.append("log-ratios to the initial student")
    if loss["length_normalize"]:
        parts.append("length-normalised log-probs")
    if loss["nll_weight"]:
        parts.append(f"plus {loss['nll_weight']} x NLL of the teacher's outputs")
    if loss.get("seqkd_first"):
        parts.append(f"after seqkd for the first {loss['seqkd_first']:.0%} of the steps")
    return ", ".join(parts)
