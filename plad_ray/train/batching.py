"""Pairs -> token ids (once, on CPU workers in Ray Data) -> padded [2B, T] batches.

Tokenization happens in a Ray Data stage before training, so trainer workers receive
token ids and spend their time in forward/backward. A batch of B pairs becomes one
forward of 2B sequences: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected.

Each side is the student's tokenization of the prompt followed by its tokenization of
the response, plus EOS when that output stopped on its own (finish reason "stop"):
the student is scored on ending where the output ended. Responses longer than
`max_length - prompt` are cut; pairs whose prompt alone does not fit are dropped and
counted: every pair keeps a `status` (ok, identical, too_long) so nothing vanishes
unaccounted.

With a scorer (`train.scorer`), each pair also gets `chosen_score`/`rejected_score`
and a `verdict` (teacher, tie, student won), and `train.student_wins` keeps, drops
(status "student_better") or flips the pairs the student won.
"""

import numpy as np

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def tokenize_pair(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int):
    """Cut both responses to fit max_length after the prompt; None if the prompt does not fit."""
    room = max_length - len(prompt_ids)
    if room < 1:
        return None
    return prompt_ids, chosen_ids[:room], rejected_ids[:room]


class PairTokenizer:
    """Ray Data stage: add prompt_ids / chosen_ids / rejected_ids columns (student tokenizer)."""

    def __init__(self, model_path: str, max_length: int, chat_template: bool = False, trust_remote_code: bool = False,
                 scorer: str | None = None, student_wins: str = "keep"):
        from transformers import AutoTokenizer

        from plad_ray.scoring import get_scorer

        self.scorer = get_scorer(scorer) if scorer else None
        self.student_wins = student_wins

        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.max_length = max_length
        self.chat_template = chat_template
        eos = self.tokenizer.eos_token_id
        self.eos = [] if eos is None else [eos]

    def _response(self, texts, finish_reasons) -> list[list[int]]:
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [t + self.eos if reason == "stop" else t for t, reason in zip(ids, finish_reasons)]

    def _prompts(self, prompts) -> list[list[int]]:
        """The prompt as the student engine saw it: one user turn of the chat template, if on."""
        if not self.chat_template:
            return self.tokenizer(list(prompts))["input_ids"]
        ids = self.tokenizer.apply_chat_template([[{"role": "user", "content": p}] for p in prompts],
                                                 add_generation_prompt=True, tokenize=True)
        return ids["input_ids"] if hasattr(ids, "keys") else ids

    def __call__(self, batch: dict) -> dict:
        """Token ids of every pair, its scores, and its `status`: ok, identical (no ranking
        signal), too_long, or student_better (dropped by policy)."""
        batch, verdicts, dropped = self._score(batch)
        prompt_ids = self._prompts(batch["prompt"])
        chosen = self._response(batch["chosen"], batch["chosen_finish_reason"])
        rejected = self._response(batch["rejected"], batch["rejected_finish_reason"])
        out = {name: [] for name in TOKEN_COLUMNS}
        status = []
        for sides, same, drop in zip(zip(prompt_ids, chosen, rejected), batch["chosen"] == batch["rejected"], dropped):
            fitted = tokenize_pair(*sides, self.max_length)
            status.append("identical" if same else "student_better" if drop else "too_long" if fitted is None else "ok")
            for name, ids in zip(TOKEN_COLUMNS, fitted or ([], [], [])):
                out[name].append(np.asarray(ids, dtype=np.int32))
        return {"id": batch["id"], "heldout": batch["heldout"], "status": np.asarray(status),
                "verdict": np.asarray(verdicts), "chosen_score": batch["chosen_score"],
                "rejected_score": batch["rejected_score"], **{k: ragged(v) for k, v in out.items()}}

    def _score(self, batch: dict) -> tuple[dict, list[str], list[bool]]:
        """Scores, verdicts and the student-wins policy; without a scorer every score is 0 and verdict ''."""
        from plad_ray.scoring import apply_policy, verdict

        n = len(batch["prompt"])
        if self.scorer is None:
            zeros = np.zeros(n, dtype=np.float32)
            return {**batch, "chosen_score": zeros, "rejected_score": zeros}, [""] * n, [False] * n
        keys = ("prompt", "chosen", "rejected", "chosen_finish_reason", "rejected_finish_reason")
        rows, verdicts, dropped = [], [], []
        for values in zip(*(batch[k] for k in keys)):
            row = dict(zip(keys, values))
            row["chosen_score"] = self.scorer(row["prompt"], row["chosen"])
            row["rejected_score"] = self.scorer(row["prompt"], row["rejected"])
            who = verdict(row["chosen_score"], row["rejected_score"])
            kept = apply_policy(row, who, self.student_wins)
            verdicts.append(who)
            dropped.append(kept is None)
            rows.append(kept or row)
        scored = {k: np.asarray([r[k] for r in rows], dtype=object) for k in keys}
        for k in ("chosen_score", "rejected_score"):
            scored[k] = np.asarray([r[k] for r in rows], dtype=np.float32)
        return {**batch, **scored}, verdicts, dropped


def ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def collate_pairs(batch: dict, pad_id: int) -> dict:
    """[2B, T] input_ids, attention_mask and response_mask (1 on scored response tokens)."""
    import torch

    prompts = list(batch["prompt_ids"])
    sequences = [np.concatenate([p, r]) for p, r in zip(prompts, batch["chosen_ids"])]
    sequences += [np.concatenate([p, r]) for p, r in zip(prompts, batch["rejected_ids"])]
    prompt_lengths = [len(p) for p in prompts] * 2
    width = max(len(s) for s in sequences)
    input_ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(sequences), width), dtype=np.int64)
    response = np.zeros((len(sequences), width), dtype=np.int64)
    for row, (seq, plen) in enumerate(zip(sequences, prompt_lengths)):
        input_ids[row, : len(seq)] = seq
        attention[row, : len(seq)] = 1
        response[row, plen : len(seq)] = 1
    out = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "response_mask": torch.from_numpy(response),
    }
    for key in ("chosen_score", "rejected_score"):
        if key in batch:
            out[key] = torch.as_tensor(np.asarray(batch[key], dtype=np.float32))
    return out


def length_grouped(bucket: dict, micro_batch_size: int, seed) -> list[dict]:
    """Split a bucket of pairs into micro-batches of similar length, in a seeded random order.

    Sorting by each pair's longer side before cutting micro-batches leaves little padding
    in the [2B, T] forward; shuffling the micro-batches keeps lengths from trending.
    """
    lengths = [len(p) + max(len(c), len(r))
               for p, c, r in zip(bucket["prompt_ids"], bucket["chosen_ids"], bucket["rejected_ids"])]
    order = np.argsort(lengths, kind="stable")
    chunks = [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    np.random.default_rng(seed).shuffle(chunks)
    return [{k: np.asarray(v)[idx] for k, v in bucket.items()} for idx in chunks]
