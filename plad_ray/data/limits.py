"""Prompt length limits, checked in Ray Data tasks before any engine starts.

A prompt must fit three places: the teacher engine (its tokens + teacher max_tokens <=
teacher.max_model_len), the student engine (likewise), and training (its student tokens
< train.max_length, leaving room for a response). vLLM would fail such a request
mid-run; training would have to drop the pair. `data.too_long` decides once, for all
three: `skip` (quarantine the prompt, counted), `truncate` (keep the end of the prompt,
where instructions such as "TL;DR:" sit, so that it fits everywhere), or `error`.
"""

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from plad_ray.data.prompts import conform, prompt_token_ids


@dataclass
class Limit:
    where: str  # what the prompt must fit, as the config names it
    tokenizer_path: str
    chat_template: bool
    max_prompt_tokens: int
    trust_remote_code: bool = False


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


class LengthCheck:
    """A Ray Data UDF over blocks of prompt rows (plad_ray.data.prompts.ROW_SCHEMA): each tokenizer is
    loaded once per worker; a good row over a limit is cut to fit (policy `truncate`) or becomes a bad
    row with check "length" naming the first limit it exceeds (`skip` and `error`: the driver decides)."""

    def __init__(self, limits: list[Limit], policy: str, source: str):
        self.counters = [_Counter(limit) for limit in limits]
        self.policy, self.source = policy, source

    def __call__(self, block: pa.Table) -> pa.Table:
        block = conform(block)
        good = pc.is_null(block.column("check")).to_pylist()
        prompts = block.column("prompt").to_pylist()
        over: dict[int, str] = {}
        rows = [i for i, g in enumerate(good) if g]
        if not rows:
            return block
        for counter in self.counters:
            limit = counter.limit
            for i, n in zip(rows, counter([prompts[i] for i in rows])):
                if n > limit.max_prompt_tokens and i not in over:
                    over[i] = f"{n} prompt tokens exceed {limit.where} = {limit.max_prompt_tokens}"
        if not over:
            return block
        check, where, reason = (block.column(c).to_pylist() for c in ("check", "where", "reason"))
        truncated = block.column("truncated").to_pylist()
        row = block.column("row").to_pylist()
        for i, why in over.items():
            if self.policy == "truncate":
                cut = _keep_end(prompts[i], self.counters)
                if cut:
                    prompts[i], truncated[i] = cut, True
                    continue
                why += " (even its last character does not fit)"
            check[i], where[i], reason[i] = "length", f"prompt source {self.source} row {row[i]}", why
            prompts[i] = prompts[i][:200]
        for name, values in (
            ("check", check),
            ("where", where),
            ("reason", reason),
            ("prompt", prompts),
            ("truncated", truncated),
        ):
            block = block.set_column(
                block.schema.get_field_index(name), name, pa.array(values, block.schema.field(name).type)
            )
        return block


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
