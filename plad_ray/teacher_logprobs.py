"""The teacher's view of a pair's sequences: per-token log-probs and its top-k alternatives.

A scoring request is one prefill of the teacher over prompt + response ids, asking vLLM for prompt
log-probs (`prompt_logprobs=k`); the positions of the response give, for each response token, the
teacher's log-prob of that token and its k most likely tokens. The sequence is the one the student
trains on: the prompt as the student engine saw it (student tokenizer and chat template) and the
response ids as generated, so position t of a score is position t of the student's training row.
That needs one vocabulary: the same id means the same token to both (checked before a run starts).

Pure functions over plain rows; the Ray Data stage is plad_ray.generate.scores.

Rows of the scores' schema (plad_ray.generate.schemas.SCORE_SCHEMA) are keyed (id, sample_index, side):
`rejected` is the student sample of pair (id, sample_index); `chosen` is the prompt's teacher output, scored
once per prompt (sample_index 0), since every sample of a prompt shares it. The top-k is stored flat, k values
per token, in rank order; the mass outside it is 1 - sum(exp(top-k)) (plad_ray.losses.topk_buckets).
"""

SIDES = ("chosen", "rejected")

KEYS = ["id", "sample_index", "side"]

CROSS_VOCABULARY = (
    "config key teacher.score_samples: the teacher's and the student's tokenizers map ids to different "
    "tokens, and teacher log-probs are read position by position on the student's ids (the same id "
    "must mean the same token, equal sizes are not enough); set teacher.score_samples=false and train "
    "on the pairs' text (hinge, logistic, seqkd)"
)


def scoring_sequences(pair: dict) -> list[dict]:
    """The sequences of one pair row to score: its student sample, and, for sample 0, the prompt's
    teacher output."""
    sides = SIDES if int(pair["sample_index"]) == 0 else ("rejected",)
    return [
        {
            "id": pair["id"],
            "sample_index": int(pair["sample_index"]),
            "side": side,
            "prompt": pair["prompt"],
            "text": pair[side],
            "finish_reason": pair[f"{side}_finish_reason"],
            "generated_ids": pair.get(f"{side}_token_ids"),
        }
        for side in sides
    ]


def fit(prompt_ids: list[int], response_ids: list[int], max_model_len: int) -> tuple[list[int], list[int]]:
    """Prompt and response cut to what one scoring request may hold: the engine samples one token after
    the prefill (vLLM's max_tokens >= 1), so prompt + response <= max_model_len - 1."""
    room = max(0, max_model_len - 1 - len(prompt_ids))
    return prompt_ids, response_ids[:room]


def read_prompt_logprobs(prompt_logprobs: list, token_ids: list[int], prompt_len: int, k: int) -> dict:
    """vLLM's prompt log-probs of one request (a list over its positions of {token id: {"logprob", "rank",
    ...}}, None at position 0) -> the response positions' columns of the scores' schema.

    At each position vLLM gives the token that is there and the k most likely ones (k entries when the
    token is among them, k + 1 when not); rank 1 is the most likely.
    """
    response = [int(t) for t in token_ids[prompt_len:]]
    logprobs, topk_ids, topk_logprobs = [], [], []
    for offset, token in enumerate(response):
        entry = prompt_logprobs[prompt_len + offset]
        entry = {int(t): v for t, v in entry.items()}
        logprobs.append(float(entry[token]["logprob"]))
        ranked = sorted(((v["rank"], t, v["logprob"]) for t, v in entry.items() if v["rank"] <= k))
        if len(ranked) != k:
            raise ValueError(f"position {prompt_len + offset}: vLLM returned {len(ranked)} of the top {k} log-probs")
        topk_ids.extend(t for _, t, _ in ranked)
        topk_logprobs.extend(float(lp) for _, _, lp in ranked)
    return {
        "num_tokens": len(response),
        "prompt_tokens": prompt_len,
        "token_ids": response,
        "logprobs": logprobs,
        "topk_ids": topk_ids,
        "topk_logprobs": topk_logprobs,
    }


def bytes_per_token(file_bytes: int, tokens: int) -> float:
    """Parquet bytes on disk per scored token (the cost of caching the teacher's view)."""
    return file_bytes / tokens if tokens else 0.0
