"""Evaluate a run's trained student(s) on its held-out prompts: greedy vLLM generation, exact match,
ROUGE-L, verifier accuracy, win rate against the teacher's cached outputs, and calibration (ECE +
reliability diagram).

    python -m jobs.evaluate --config configs/tiny-cpu.yaml [--set eval.scorer=reverse ...]
    ray job submit --working-dir . -- python -m jobs.evaluate --config configs/<name>.yaml

Reads output_dir/teacher/ and output_dir/student/ (round-<r>/student/ with train.rounds > 1);
writes output_dir/eval/ (report.json, summary.md, reliability.png, generations.jsonl).
jobs.distill runs the same stage at its end.
"""

from jobs import cli
from plad_ray import pipeline
from plad_ray.data import storage
from plad_ray.model_card import write_card


def run(args) -> None:
    cfg = cli.load(args)
    report = pipeline.evaluate(cfg, check_only=args.check)
    if report is not None:
        from plad_ray.evaluation.stage import headline

        run_report = storage.read_json(cfg.layout().report())
        card = write_card(cfg, run_report, run_report.get("command") or args.command) if run_report else None
        if card:  # the card's evaluation table follows the new evaluation; its command stays the one that trained
            print(f"[plad-ray] model card -> {card}", flush=True)
        print("\n" + "\n".join(f"{name:<24} {headline(m)}" for name, m in report["models"].items()), flush=True)
        cli.done(cfg)


if __name__ == "__main__":
    cli.main(run, __doc__)
