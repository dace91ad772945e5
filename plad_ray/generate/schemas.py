"""The Parquet schemas of what the generation stages write, and the columns each reader needs from them.

    teacher step (teacher.py)  -> output_dir/teacher/          TEACHER_SCHEMA, keyed by id
    student step (student.py)  -> output_dir/pairs/            PAIR_SCHEMA, keyed by (id, sample_index)
    scoring step (scores.py)   -> output_dir/teacher_scores/   SCORE_SCHEMA, keyed by (id, sample_index, side)

A stage that reads another's output checks these columns first (plad_ray.data.parquet.require_columns): a folder
written by another version, or by hand, stops the run with one line naming what is missing.
"""

import pyarrow as pa

TEACHER_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("teacher_text", pa.string()),
        ("teacher_num_tokens", pa.int32()),  # generated tokens, teacher tokenizer, incl. EOS if it stopped on one
        ("teacher_finish_reason", pa.string()),  # eos | stop (a stop string) | length (see finish_reason)
        ("teacher_token_ids", pa.list_(pa.int32())),  # the ids the teacher engine generated; null from an HTTP teacher
        ("teacher_model", pa.string()),
        ("teacher_sampling", pa.string()),  # JSON of the sampling parameters
    ]
)

PAIR_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # prompt id
        ("sample_index", pa.int32()),  # which student sample of this prompt, 0..k-1
        ("prompt", pa.string()),
        ("chosen", pa.string()),  # teacher output y_T
        ("rejected", pa.string()),  # student output y_S
        ("chosen_num_tokens", pa.int32()),
        ("rejected_num_tokens", pa.int32()),
        ("chosen_finish_reason", pa.string()),  # eos | stop | length
        ("rejected_finish_reason", pa.string()),
        # The ids each side was generated as, scored as they are (no re-tokenisation of the text):
        # the student's own ids; the teacher's when teacher and student share a vocabulary, else null.
        ("chosen_token_ids", pa.list_(pa.int32())),
        ("rejected_token_ids", pa.list_(pa.int32())),
        ("teacher_model", pa.string()),
        ("student_model", pa.string()),
        ("teacher_sampling", pa.string()),
        ("student_sampling", pa.string()),
        ("heldout", pa.bool_()),  # kept out of training, used for evaluation
    ]
)

SCORE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("sample_index", pa.int32()),  # the pair's for `rejected`; 0 for `chosen` (the prompt's teacher output)
        ("side", pa.string()),  # chosen | rejected
        ("num_tokens", pa.int32()),  # response tokens scored (the response, cut to the teacher's max_model_len)
        ("prompt_tokens", pa.int32()),  # prompt tokens prefilled before them
        ("token_ids", pa.list_(pa.int32())),  # the response ids scored
        ("logprobs", pa.list_(pa.float32())),  # the teacher's log-prob of each of them
        ("topk_ids", pa.list_(pa.int32())),  # num_tokens x k, flat, most likely first
        ("topk_logprobs", pa.list_(pa.float32())),  # their log-probs, same layout
    ]
)

# What each reader takes from those outputs.
# the student step pairs every teacher row (teacher_token_ids when it has them)
TEACHER_READ_BY_STUDENT = tuple(n for n in TEACHER_SCHEMA.names if n != "teacher_token_ids")
TEACHER_READ_BY_EVALUATION = ("id", "prompt", "teacher_text")
# training tokenizes a run's own pairs (their token ids when they have them: plad_ray.pairs.with_training_columns)
PAIRS_READ_BY_TRAINING = (
    "id",
    "sample_index",
    "prompt",
    "chosen",
    "rejected",
    "chosen_finish_reason",
    "rejected_finish_reason",
    "heldout",
)
SCORES_READ_BY_TRAINING = ("id", "sample_index", "side", "num_tokens", "logprobs", "topk_ids", "topk_logprobs")
