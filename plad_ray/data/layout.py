"""Where every output of a run lives under output_dir: the one definition every stage asks.

    output_dir/
      run.json            the config keys each stage's outputs depend on (plad_ray/outputs.py)
      logs/run.log        engine, Ray, DeepSpeed and library logs (plad_ray/console.py; appended per run)
      quarantine/prompts/ prompt rows set aside, with where they sit and why (JSON lines; rewritten per run)
      quarantine/teacher/ prompts a black-box teacher refused (HTTP 4xx, empty) or kept failing on while it
                          answered others, with status and reason (JSON lines; teacher.partial/: this run's,
                          until the teacher step ends normally)
      teacher/            teacher outputs by prompt id (shared by every round)
      pairs/              round 1's preference pairs
      teacher_scores/     round 1's teacher log-probs of the pairs' sequences (teacher.score_samples)
      train/              round 1's Ray Train state and checkpoints (train/tensorboard/: metrics)
      student/            round 1's trained student (HF folder)
      train_report.json   round 1's training figures
      round-<r>/          round r > 1: pairs/, teacher_scores/, train/, student/, train_report.json
      eval/               generation quality of the final student (the evaluate stage owns its files)
      report.json, summary.md, loss_curve.png   the run's report and its summary

Round 1 writes at the top level, so a one-round run has the plain layout above.
"""

from dataclasses import dataclass

from plad_ray.data import storage
from plad_ray.errors import DataError

RUN_FILE = "run.json"
QUARANTINE = "quarantine"
LOGS = "logs"
TEACHER = "teacher"
PAIRS = "pairs"
SCORES = "teacher_scores"
TRAIN = "train"  # Ray Train's run name under a round's folder
STUDENT = "student"
TRAIN_REPORT = "train_report.json"
EVAL = "eval"
REPORT = "report.json"
SUMMARY = "summary.md"
LOSS_CURVE = "loss_curve.png"
ROUND_PREFIX = "round-"


@dataclass(frozen=True)
class OutputLayout:
    root: str  # output_dir: a local path or a pyarrow URI

    def run_file(self) -> str:
        return storage.join(self.root, RUN_FILE)

    def logs(self) -> str:
        return storage.join(self.root, LOGS)

    def quarantine(self) -> str:
        """Prompt rows the checks set aside (rewritten by every run)."""
        return storage.join(self.root, QUARANTINE, "prompts")

    def teacher_refused(self) -> str:
        """Prompts a black-box teacher refused or failed on (kept across runs: a re-run does not ask again)."""
        return storage.join(self.root, QUARANTINE, "teacher")

    def teacher(self) -> str:
        return storage.join(self.root, TEACHER)

    def teacher_made(self) -> dict:
        """The teacher cache's manifest (rows, files); a DataError when the cache is missing or incomplete."""
        made = storage.manifest(self.teacher())
        if made is None:
            raise DataError(f"teacher cache {self.teacher()}: missing; run jobs.generate_pairs or jobs.distill first")
        return made

    def round_dir(self, round: int = 1) -> str:
        return self.root if round == 1 else storage.join(self.root, f"{ROUND_PREFIX}{round}")

    def pairs(self, round: int = 1) -> str:
        return storage.join(self.round_dir(round), PAIRS)

    def scores(self, round: int = 1) -> str:
        return storage.join(self.round_dir(round), SCORES)

    def train_state(self, round: int = 1) -> str:
        return storage.join(self.round_dir(round), TRAIN)

    def student(self, round: int = 1) -> str:
        return storage.join(self.round_dir(round), STUDENT)

    def train_report(self, round: int = 1) -> str:
        return storage.join(self.round_dir(round), TRAIN_REPORT)

    def report(self) -> str:
        return storage.join(self.root, REPORT)

    def eval(self) -> str:
        return storage.join(self.root, EVAL)

    def summary(self) -> str:
        return storage.join(self.root, SUMMARY)

    def loss_curve(self) -> str:
        return storage.join(self.root, LOSS_CURVE)
