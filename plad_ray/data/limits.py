"""Prompt length limits, checked in the driver before any engine starts.

A prompt must fit three places: the teacher engine (its tokens + teacher max_tokens <=
teacher.max_model_len), the student engine (likewise), and training (its student tokens
< train.max_length, leaving room for a response). vLLM would fail such a request
mid-run; training would have to drop the pair. `data.too_long` decides once, for all
three: `skip` (quarantine the prompt, counted), `truncate` (keep the end of the prompt,
where instructions such as "TL;DR:" sit, so that it fits everywhere), or `error`.
"""

from dataclasses import dataclass

import pyarrow as pa

from plad_ray.config import Config
from plad_ray.data.prompts import prompt_token_ids
from plad_ray.errors import DataError


@dataclass
class Limit:
    where: str  # what the prompt must fit, as the config names it
    tokenizer_path: str
    chat_template: bool
    max_prompt_tokens: int
    trust_remote_code: bool = False


def prompt_limits(cfg: Config, teacher_path: str | None, student_path: str) -> list[Limit]:
    """The limits to check; a black-box teacher (no tokenizer here) is checked by its server."""
    t, s = cfg.teacher, cfg.student
    limits = [
        Limit("student.max_model_len - student.sampling.max_tokens", student_path, s.chat_template,
              s.max_model_len - s.sampling.max_tokens, s.trust_remote_code),
        Limit("train.max_length - 1", student_path, s.chat_template, cfg.train.max_length - 1, s.trust_remote_code),
    ]
    if teacher_path is not None:
        limits.insert(0, Limit("teacher.max_model_len - teacher.sampling.max_tokens", teacher_path, t.chat_template,
                               t.max_model_len - t.sampling.max_tokens, t.trust_remote_code))
    return limits


class _Counter:
    """Prompt token counts as an engine sees them (chat template applied when configured)."""

    def __init__(self, limit: Limit):
        from transformers import AutoTokenizer

        self.limit = limit
        self.tokenizer = AutoTokenizer.from_pretrained(limit.tokenizer_path, trust_remote_code=limit.trust_remote_code)

    def __call__(self, prompts: list[str]) -> list[int]:
        return [len(x) for x in prompt_token_ids(self.tokenizer, prompts, self.limit.chat_template)]

    def fits(self, prompt: str) -> bool:
        return self([prompt])[0] <= self.limit.max_prompt_tokens


def apply_length_policy(table: pa.Table, limits: list[Limit], policy: str, source: str) -> tuple[pa.Table, list, int]:
    """(prompts to use, quarantined rows, number truncated) under data.too_long."""
    counters = [_Counter(limit) for limit in limits]
    ids, prompts = table.column("id").to_pylist(), table.column("prompt").to_pylist()
    over: dict[int, tuple[Limit, int]] = {}
    for counter in counters:
        for row, n in enumerate(counter(prompts)):
            if n > counter.limit.max_prompt_tokens and row not in over:
                over[row] = (counter.limit, n)
    quarantined, truncated, skipped = [], 0, set()
    for row, (limit, n) in sorted(over.items()):
        reason = f"{n} prompt tokens exceed {limit.where} = {limit.max_prompt_tokens}"
        if policy == "error":
            raise DataError(f"prompt source {source} row {row} (id {ids[row]}): {reason}; shorten it, raise the "
                            "limit, or set data.too_long to skip or truncate")
        if policy == "truncate":
            cut = _keep_end(prompts[row], counters)
            if cut:
                prompts[row] = cut
                truncated += 1
                continue
            reason += " (even its last character does not fit)"
        skipped.add(row)
        quarantined.append({"where": f"prompt source {source} row {row}", "id": ids[row], "reason": reason,
                            "prompt": prompts[row][:200]})
    keep = [r for r in range(len(ids)) if r not in skipped]
    out = pa.table({"id": pa.array([ids[r] for r in keep], pa.string()),
                    "prompt": pa.array([prompts[r] for r in keep], pa.string())}, schema=table.schema)
    return out, quarantined, truncated


def _keep_end(prompt: str, counters: list[_Counter]) -> str | None:
    """The longest suffix of `prompt` that fits every limit (binary search on its start)."""
    lo, hi = 1, len(prompt) - 1  # the suffix starts somewhere in [lo, hi]
    best = None
    while lo <= hi:
        start = (lo + hi) // 2
        if all(c.fits(prompt[start:]) for c in counters):
            best, hi = prompt[start:], start - 1
        else:
            lo = start + 1
    return best
