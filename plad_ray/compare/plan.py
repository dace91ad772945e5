"""What `plad-ray compare` decides before and after its runs: pure functions, no Ray, no I/O.

--objectives seqkd,hinge[beta=0.5;nll_weight=1]   -> Objective(name, train.* overrides); the first is the default
  hinge[beta=0.1|0.5]                             -> its candidates, tuned on dev with the rate (best_candidate)
held-out prompt ids                               -> dev / test (a hash of the id: stable across runs and machines)
per-prompt outputs of one model                   -> per-prompt scores (greedy correct, best-of-n by own likelihood)
the arms' test scores                             -> the table's rows and the verdicts (plad_ray.compare.stats)
"""

import hashlib
import itertools
import math
from dataclasses import dataclass

from plad_ray.compare import stats
from plad_ray.errors import ConfigError

DEV_FRACTION = 0.3  # of the held-out prompts: the learning rate is chosen on these, the verdict uses the rest
AA_SEED_OFFSET = 1000  # the A/A arm's data-order seed: seed + this, the default objective at its chosen rate
MAX_WIDENINGS = 3  # grid widening rounds per objective (stats.next_rates) before the edge is reported as such


@dataclass(frozen=True)
class Objective:
    """One contender: its name as given on the command line and the config overrides that make it. With
    alternatives (`hinge[beta=0.1|0.5;nll_weight=1]`), `candidates` are its settings, one per combination, tuned on
    dev together with the rate; the best of them is the contender."""

    name: str
    overrides: tuple[str, ...]
    candidates: tuple["Objective", ...] = ()

    @property
    def choices(self) -> tuple["Objective", ...]:
        """What the dev search trains: its candidates, or (untuned) itself."""
        return self.candidates or (self,)

    @property
    def slug(self) -> str:
        keep = "".join(c if c.isalnum() or c == "." else "-" for c in self.name.lower())
        return "-".join(p for p in keep.split("-") if p)[:48] + "-" + _digest(self.name)[:6]


def parse_objectives(spec: str) -> list[Objective]:
    """`seqkd,hinge[beta=0.5;nll_weight=1]` -> objectives: a train.loss.type, with train.loss.* keys in brackets
    separated by `;`. Another train.* key is given whole: `seqkd[train.micro_batch_size=4]`. Values separated by
    `|` are alternatives tuned on dev: `hinge[beta=0.1|0.5;nll_weight=1|5]` has 4 candidates."""
    objectives, seen = [], set()
    for item in _split_top(spec):
        item = item.strip()
        kind, _, rest = item.partition("[")
        kind = kind.strip()
        if not kind or (rest and not rest.endswith("]")) or not kind.replace("_", "").isalnum():
            raise ConfigError(
                f"--objectives: {item!r} is not an objective; write a loss type, with train.loss keys in brackets, "
                "e.g. seqkd,hinge[beta=0.5;nll_weight=1]"
            )
        settings = []  # (key as written, full config key, its values)
        for setting in filter(None, (s.strip() for s in rest[:-1].split(";"))) if rest else ():
            key, eq, value = setting.partition("=")
            values = [v.strip() for v in value.split("|")]
            if not eq or not key.strip() or not all(values):
                raise ConfigError(f"--objectives: {setting!r} in {item!r} is not key=value (or key=value|value)")
            key = key.strip()
            settings.append((key, key if key.startswith("train.") else "train.loss." + key, values))
        if item in seen:
            raise ConfigError(f"--objectives: {item!r} is listed twice")
        seen.add(item)
        combos = list(itertools.product(*(values for _, _, values in settings)))
        candidates = tuple(
            Objective(
                kind + (f"[{';'.join(f'{k}={v}' for (k, _, _), v in zip(settings, combo))}]" if settings else ""),
                (f"train.loss.type={kind}", *(f"{full}={v}" for (_, full, _), v in zip(settings, combo))),
            )
            for combo in combos
        )
        objectives.append(Objective(item, candidates[0].overrides, candidates if len(combos) > 1 else ()))
    if len(objectives) < 2:
        raise ConfigError("--objectives: give at least two, the default first (e.g. seqkd,hinge)")
    return objectives


def _split_top(spec: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, current = [], 0, ""
    for c in spec:
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += c
    return [p for p in parts + [current] if p.strip()]


def parse_grid(spec: str | None, default_rate: float) -> list[float]:
    """`1e-4,3e-4,1e-3`, or (None) the config's rate with a step of about 3 either side."""
    if not spec:
        return sorted({float(f"{default_rate / 3:.3g}"), default_rate, float(f"{default_rate * 3:.3g}")})
    try:
        rates = sorted({float(r) for r in spec.split(",") if r.strip()})
    except ValueError:
        raise ConfigError(f"--grid: {spec!r} is not a comma-separated list of learning rates, e.g. 1e-4,3e-4,1e-3")
    if not rates or not all(0 < r < 1 and math.isfinite(r) for r in rates):
        raise ConfigError(f"--grid: {spec!r}: learning rates must lie in (0, 1)")
    return rates


def search_rate(grid: list[float], dev_scores, max_widenings: int = MAX_WIDENINGS) -> dict[float, float]:
    """{rate: dev score} over `grid`, widened (stats.next_rates) while the best rate is at an end of it, at most
    `max_widenings` times. `dev_scores(rates) -> {rate: score}` trains and evaluates one arm per rate."""
    dev, rates, widened = {}, sorted(grid), 0
    while rates:
        dev.update(dev_scores(rates))
        more = [r for r in stats.next_rates(dev) if r not in dev]
        rates, widened = (more, widened + 1) if more and widened < max_widenings else ([], widened)
    return dev


def best_candidate(curves: dict[str, dict[float, float]]) -> str:
    """The candidate whose best dev rate scores highest (the first listed on a tie)."""
    return max(curves, key=lambda name: curves[name][stats.best_rate(curves[name])])


def at_edge(dev: dict[float, float]) -> bool:
    """Whether the best dev rate is still an end of the grid (or the grid too small to have an inside)."""
    best = stats.best_rate(dev)
    return len(dev) < 3 or best in (min(dev), max(dev))


def is_dev(prompt_id: str, fraction: float = DEV_FRACTION) -> bool:
    """A held-out prompt's half: dev (rate choice) or test (verdict), by a hash of its id salted apart from
    pairs.is_heldout, so the two splits are independent of each other."""
    return int.from_bytes(_digest(f"compare-dev:{prompt_id}", raw=True)[:8], "big") / 2**64 < fraction


def prompt_scores(rows: list[dict], outputs: list[dict], correct) -> list[dict]:
    """Per held-out prompt: the greedy output's correctness and, with samples, best-of-n's (the sample the model
    itself finds likeliest, by mean token log-prob). `correct(row, text) -> 0.0 | 1.0`."""
    out = []
    for row, o in zip(rows, outputs):
        record = {"id": row["id"], "text": o["text"], "correct": correct(row, o["text"])}
        samples = o.get("samples") or []
        if samples:
            best = max(samples, key=lambda s: s["mean_logprob"])
            record["best_of_n"] = correct(row, best["text"])
        out.append(record)
    return out


def mean_of(records: list[dict], ids: set, key: str = "correct") -> float:
    picked = [r[key] for r in records if r["id"] in ids and key in r]
    return sum(picked) / len(picked) if picked else float("nan")


def scores_by_seed(runs: dict[int, list[dict]], ids: list[str], key: str = "correct") -> list[list[float]]:
    """[seeds, prompts] of one objective's test scores, prompts in the order of `ids`."""
    table = []
    for seed in sorted(runs):
        by_id = {r["id"]: r[key] for r in runs[seed] if key in r}
        table.append([by_id[i] for i in ids])
    return table


def rule(default: str, level: float, aa_offset: int = AA_SEED_OFFSET) -> str:
    return (
        f"An objective beats the default ({default}) only if its mean test difference in greedy accuracy is above "
        f"the A/A noise floor (the largest magnitude of the {level:.0%} interval between the default and itself "
        f"trained with another data order, seed + {aa_offset}) and its {level:.0%} hierarchical-bootstrap interval "
        "(seeds, then prompts) lies above 0; it is worse under the mirror image; otherwise no difference is shown. "
        "Each objective's learning rate is the best on the dev prompts at seed 0, the grid widened until the best "
        "rate is inside it; an objective given alternatives (key=a|b) also takes its best setting there."
    )


def _digest(text: str, raw: bool = False):
    h = hashlib.sha256(text.encode())
    return h.digest() if raw else h.hexdigest()
