"""Pairs -> token ids (once, on CPU workers in Ray Data) -> padded [2B, T] batches.

Tokenization happens in a Ray Data stage before training, so trainer workers receive
token ids and spend their time in forward/backward. A batch of B pairs becomes one
forward of 2B sequences: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected.
(A listwise batch of B prompts with K student samples each is B + B*K rows: `collate_groups`.)

Each side is the student's tokenization of the prompt followed by the response *as it
was generated*: the engine's own token ids (`chosen_token_ids` / `rejected_token_ids`)
when the pair carries them, which is always the case for the student's samples and for
the teacher's outputs when teacher and student share a vocabulary. Re-tokenising decoded
text is not the identity for subword tokenizers (a SentencePiece word-prefix marker, or
an id sequence the tokenizer would not produce itself), so the ids are what is scored.
Text is tokenized only when no ids exist (another tokenizer's teacher, external pairs):
then the response is followed by EOS only if that output ended on EOS (finish reason
"eos"), by the stop string if a stop string ended it ("stop"; vLLM's ids include the
token that completed it, so both paths end the same way), and by nothing if it was cut
at max_tokens. Responses longer than `max_length - prompt` are cut; pairs whose prompt
alone does not fit are dropped and counted: every pair keeps a `status` (ok, identical,
too_long, student_better) so nothing vanishes unaccounted.

With a scorer (`train.scorer`), the same stage first judges each pair (`scoring.judge_pairs`,
a pure step): `chosen_score`/`rejected_score`, a `verdict` (teacher, tie, student won), and
`train.student_wins` keeps, drops (status "student_better") or flips the pairs the student won.
"""

import numpy as np

from plad_ray.data.prompts import prompt_token_ids
from plad_ray.pairs import response_ids
from plad_ray.verifiers import get_scorer, judge_pairs

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
# The teacher's top-k per response token (teacher_scores/), flat, k per token, and how many tokens they cover.
TOPK_COLUMNS = (
    "chosen_topk_ids",
    "chosen_topk_logps",
    "chosen_topk_tokens",
    "rejected_topk_ids",
    "rejected_topk_logps",
    "rejected_topk_tokens",
)


def tokenize_pair(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int):
    """Cut both responses to fit max_length after the prompt; None if the prompt does not fit."""
    room = max_length - len(prompt_ids)
    if room < 1:
        return None
    return prompt_ids, chosen_ids[:room], rejected_ids[:room]


class PairTokenizer:
    """Ray Data stage: judge each pair (scoring.judge_pairs), then add prompt_ids / chosen_ids /
    rejected_ids columns (student tokenizer).

    `chosen_stop` / `rejected_stop`: the stop string each side was sampled with (teacher
    and student `sampling.stop`), for outputs that a stop string ended and that carry no ids.
    """

    def __init__(
        self,
        model_path: str,
        max_length: int,
        chat_template: bool = False,
        trust_remote_code: bool = False,
        scorer: str | None = None,
        student_wins: str = "keep",
        chosen_stop: str | None = None,
        rejected_stop: str | None = None,
    ):
        from transformers import AutoTokenizer

        self.scorer = get_scorer(scorer) if scorer else None
        self.student_wins = student_wins
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.max_length = max_length
        self.chat_template = chat_template
        self.stops = {"chosen": chosen_stop, "rejected": rejected_stop}
        eos = self.tokenizer.eos_token_id
        self.eos = [] if eos is None else [eos]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prompts(self, prompts) -> list[list[int]]:
        """The prompt as the student engine saw it: one user turn of the chat template, if on."""
        return prompt_token_ids(self.tokenizer, prompts, self.chat_template)

    def _responses(self, batch: dict, side: str) -> list[list[int]]:
        n = len(batch["prompt"])
        generated = batch.get(f"{side}_token_ids")
        return [
            response_ids(
                generated[i] if generated is not None else None,
                batch[side][i],
                batch[f"{side}_finish_reason"][i],
                self._encode,
                self.eos,
                self.stops[side],
            )
            for i in range(n)
        ]

    def __call__(self, batch: dict) -> dict:
        """Token ids of every pair, its scores, and its `status`: ok, identical (no ranking
        signal), too_long, or student_better (dropped by policy)."""
        prompt_ids = self._prompts(batch["prompt"])
        rows = [
            {"prompt": p, "chosen": c, "rejected": r, "chosen_ids": ci, "rejected_ids": ri}
            for p, c, r, ci, ri in zip(
                batch["prompt"],
                batch["chosen"],
                batch["rejected"],
                self._responses(batch, "chosen"),
                self._responses(batch, "rejected"),
            )
        ]
        if "chosen_score" in batch:  # scored before this stage (the teacher scorer: score_joins.with_teacher_scores)
            for row, c, r in zip(rows, batch["chosen_score"], batch["rejected_score"]):
                row.update(chosen_score=float(c), rejected_score=float(r))
        topk = [key for key in TOPK_COLUMNS if key in batch]  # the teacher's top-k (score_joins.with_teacher_topk)
        for i, row in enumerate(rows):
            row.update({key: batch[key][i] for key in topk})
        rows, verdicts, dropped = judge_pairs(rows, self.scorer, self.student_wins)
        out = {name: [] for name in TOKEN_COLUMNS + tuple(topk)}
        status = []
        for row, prompt, drop in zip(rows, prompt_ids, dropped):
            fitted = tokenize_pair(prompt, row["chosen_ids"], row["rejected_ids"], self.max_length)
            same = row["chosen"] == row["rejected"]
            status.append("too_long" if fitted is None else "identical" if same else "student_better" if drop else "ok")
            for name, ids in zip(TOKEN_COLUMNS, fitted or ([], [], [])):
                out[name].append(np.asarray(ids, dtype=np.int32))
            for side, response in (("chosen", 1), ("rejected", 2)):
                if f"{side}_topk_ids" in topk:  # cut with the response it scores
                    out_topk(out, row, side, len(fitted[response]) if fitted else 0)
        sample_index = batch["sample_index"] if "sample_index" in batch else np.zeros(len(rows), dtype=np.int32)
        return {
            "id": batch["id"],
            "sample_index": np.asarray(sample_index, dtype=np.int32),
            "heldout": batch["heldout"],
            "status": np.asarray(status),
            "verdict": np.asarray(verdicts),
            "chosen_score": np.asarray([r.get("chosen_score", 0.0) for r in rows], dtype=np.float32),
            "rejected_score": np.asarray([r.get("rejected_score", 0.0) for r in rows], dtype=np.float32),
            **{k: np.asarray(v, dtype=np.int32) if k.endswith("_topk_tokens") else ragged(v) for k, v in out.items()},
        }


def out_topk(out: dict, row: dict, side: str, kept: int) -> None:
    """A side's top-k columns cut to the first `kept` response tokens (the teacher may have scored fewer:
    its max_model_len), appended to `out`."""
    scored = int(row[f"{side}_topk_tokens"])
    k = len(row[f"{side}_topk_ids"]) // scored if scored else 0
    n = min(kept, scored)
    out[f"{side}_topk_ids"].append(np.asarray(row[f"{side}_topk_ids"], dtype=np.int32)[: n * k])
    out[f"{side}_topk_logps"].append(np.asarray(row[f"{side}_topk_logps"], dtype=np.float32)[: n * k])
    out[f"{side}_topk_tokens"].append(n)


def ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def _pad(sequences: list[np.ndarray], prompt_lengths: list[int], pad_id: int) -> dict:
    """input_ids, attention_mask and response_mask (1 on scored response tokens) of equal width."""
    import torch

    width = max(len(s) for s in sequences)
    input_ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(sequences), width), dtype=np.int64)
    response = np.zeros((len(sequences), width), dtype=np.int64)
    for row, (seq, plen) in enumerate(zip(sequences, prompt_lengths)):
        input_ids[row, : len(seq)] = seq
        attention[row, : len(seq)] = 1
        response[row, plen : len(seq)] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "response_mask": torch.from_numpy(response),
    }


def collate_pairs(batch: dict, pad_id: int) -> dict:
    """[2B, T] input_ids, attention_mask and response_mask (1 on scored response tokens).

    `ranked` (float [B]) is 0 for pairs whose two sides are the same text: they train the
    NLL part of an objective but carry no ranking signal.
    """
    import torch

    prompts = list(batch["prompt_ids"])
    sequences = [np.concatenate([p, r]) for p, r in zip(prompts, batch["chosen_ids"])]
    sequences += [np.concatenate([p, r]) for p, r in zip(prompts, batch["rejected_ids"])]
    out = _pad(sequences, [len(p) for p in prompts] * 2, pad_id)
    for key in ("chosen_score", "rejected_score"):
        if key in batch:
            out[key] = torch.as_tensor(np.asarray(batch[key], dtype=np.float32))
    if "status" in batch:
        out["ranked"] = torch.as_tensor(np.asarray(batch["status"]) != "identical", dtype=torch.float32)
    if "rejected_topk_ids" in batch:
        out.update(collate_topk(batch, [len(p) for p in prompts], out["input_ids"].shape[1]))
    return out


def collate_topk(batch: dict, prompt_lengths: list[int], width: int) -> dict:
    """The teacher's top-k at the positions of the [2B, width] rows (chosen rows, then rejected):
    `topk_ids` / `topk_logps` [2B, width, k] hold, at the position of response token t, the teacher's k
    most likely tokens there (what the logits one position earlier predict); `topk_mask` [2B, width] is 1
    where they exist. A side without top-k columns (onpolicy_kd scores only the samples) is all 0."""
    import torch

    b = len(prompt_lengths)
    sides = [side for side in ("chosen", "rejected") if f"{side}_topk_ids" in batch]
    widths = [
        len(ids) // n for side in sides for ids, n in zip(batch[f"{side}_topk_ids"], batch[f"{side}_topk_tokens"]) if n
    ]
    k = widths[0] if widths else 1
    ids = np.zeros((2 * b, width, k), dtype=np.int64)
    logps = np.zeros((2 * b, width, k), dtype=np.float32)
    mask = np.zeros((2 * b, width), dtype=np.float32)
    for offset, side in ((0, "chosen"), (b, "rejected")):
        if side not in sides:
            continue
        for i, (flat_ids, flat_logps, n) in enumerate(
            zip(batch[f"{side}_topk_ids"], batch[f"{side}_topk_logps"], batch[f"{side}_topk_tokens"])
        ):
            start, n = prompt_lengths[i], int(n)
            ids[offset + i, start : start + n] = np.asarray(flat_ids).reshape(n, k)
            logps[offset + i, start : start + n] = np.asarray(flat_logps).reshape(n, k)
            mask[offset + i, start : start + n] = 1
    return {
        "topk_ids": torch.from_numpy(ids),
        "topk_logps": torch.from_numpy(logps),
        "topk_mask": torch.from_numpy(mask),
    }


def group_samples(batch: dict) -> dict:
    """Ray Data `map_groups` over one prompt id's pairs: one row with its K samples' rejected ids.

    Listwise training ranks the teacher output above every student sample of its prompt in
    one loss term, so a prompt's samples must share a micro-batch: one row per prompt.
    """
    ranked = np.asarray(batch["status"]) != "identical"
    return {
        "id": batch["id"][:1],
        "prompt_ids": ragged([batch["prompt_ids"][0]]),
        "chosen_ids": ragged([batch["chosen_ids"][0]]),
        "rejected_ids_list": ragged([ragged([r for r, keep in zip(batch["rejected_ids"], ranked) if keep])]),
        "num_samples": np.asarray([int(ranked.sum())], dtype=np.int32),
    }


def collate_groups(batch: dict, pad_id: int) -> dict:
    """[B + B*K, T]: B teacher outputs, then K sample slots per prompt (prompt-major), and
    `rejected_mask` [B, K] (1 = a real sample; prompts with fewer than K fill with empty slots)."""
    import torch

    prompts = list(batch["prompt_ids"])
    samples = [list(s) for s in batch["rejected_ids_list"]]
    k = max(len(s) for s in samples)
    sequences = [np.concatenate([p, c]) for p, c in zip(prompts, batch["chosen_ids"])]
    lengths = [len(p) for p in prompts]
    mask = np.zeros((len(prompts), k), dtype=np.float32)
    for b, (p, rows) in enumerate(zip(prompts, samples)):
        for j in range(k):
            mask[b, j] = j < len(rows)
            sequences.append(np.concatenate([p, rows[j]]) if j < len(rows) else p)
            lengths.append(len(p))
    out = _pad(sequences, lengths, pad_id)
    out["rejected_mask"] = torch.from_numpy(mask)
    return out


def length_grouped(bucket: dict, micro_batch_size: int, seed) -> list[dict]:
    """Split a bucket of pairs into micro-batches of similar length, in a seeded random order.

    Sorting by each pair's longer side before cutting micro-batches leaves little padding
    in the [2B, T] forward; shuffling the micro-batches keeps lengths from trending.
    """
    lengths = [
        len(p) + max(len(c), len(r)) for p, c, r in zip(bucket["prompt_ids"], bucket["chosen_ids"], _longest(bucket))
    ]
    order = np.argsort(lengths, kind="stable")
    chunks = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    np.random.default_rng(seed).shuffle(chunks)
    return [{k: np.asarray(v)[idx] for k, v in bucket.items()} for idx in chunks]


def _longest(bucket: dict):
    """Each row's longest rejected side (pairs: the one; groups: the longest of its samples)."""
    if "rejected_ids" in bucket:
        return bucket["rejected_ids"]
    return [max(rows, key=len, default=np.zeros(0)) for rows in bucket["rejected_ids_list"]]
