"""The teacher scoring step (teacher.score_samples): the teacher's log-probs of each round's pairs.

    pairs/ --(id, sample, side) sequences--> teacher vLLM engines, prefill only --> teacher_scores/

Every student sample, and each prompt's teacher output once, is prefilled by the teacher's vLLM engines
with `prompt_logprobs=k` (ray.data.llm returns them in its rows), or by a teacher endpoint's server
(plad_ray.generate.endpoint_scores); plad_ray.teacher_logprobs reads them.
Like the pairs, the scores resume per key (id, sample_index, side): a crashed run's written rows are kept
and only the missing keys are scored, by a Ray Data anti-join; the commit refuses a key twice.
"""

import functools
import time

from plad_ray import teacher_logprobs
from plad_ray.checks import Inputs
from plad_ray.config import EngineConfig, StudentEngineConfig, TeacherEngineConfig
from plad_ray.data import parquet, storage
from plad_ray.data.prompts import prompt_token_ids
from plad_ray.errors import DataError
from plad_ray.generate import engines, schemas
from plad_ray.generate.endpoint_scores import scores_http, scoring_params
from plad_ray.generate.endpoint_stats import write_from_endpoint
from plad_ray.generate.stages import not_done
from plad_ray.run_context import RunContext


def score_pairs(
    teacher: TeacherEngineConfig,
    student: StudentEngineConfig,
    run: RunContext,
    inputs: Inputs,
    log=print,
    round: int = 1,
) -> dict:
    """The teacher's log-probs and top-k of every sequence of round `round`'s pairs not yet scored (each sequence
    as the student's tokenizer cuts it: `student`'s chat template and stop string)."""
    layout = run.layout
    uri, pairs_uri = layout.scores(round), layout.pairs(round)
    pairs_manifest = storage.manifest(pairs_uri)
    if pairs_manifest is None:
        raise DataError(f"pairs {pairs_uri}: missing or incomplete; generate the pairs before scoring them")
    k = teacher.score_top_k
    expected = pairs_manifest["rows"] + pairs_manifest["rows"] // student.num_samples
    existing = storage.manifest(uri)
    if existing is not None and existing["rows"] >= expected:
        log(f"[generate] teacher scores: {existing['rows']} sequences already scored at {uri}; 0 teacher requests")
        return {"scored_sequences": existing["rows"], "scored_now": 0}
    done_ds = parquet.done_keys_dataset(uri, teacher_logprobs.KEYS, log)
    done = 0 if done_ds is None else done_ds.count()
    todo = expected - done
    log(
        f"[generate] round {round} teacher scores: {todo} sequences to prefill with {teacher.model} "
        f"(top {k} log-probs per token; 0 teacher text generated)"
        + (f"; {done} scored by an earlier run" if done else "")
    )
    start = time.perf_counter()
    earlier = parquet.uncommitted_files(uri)
    endpoint = None
    if todo:
        sequences = _to_score(parquet.read(pairs_uri), done_ds, 1 + done // parquet.JOIN_ROWS_PER_PARTITION)
        workers = teacher.endpoint.concurrency if teacher.endpoint else teacher.replicas
        sequences = engines.split_for_replicas(sequences, todo, teacher.batch_size, workers)
        ids = SequenceIds(
            inputs.student_for_round(run, round),
            student.trust_remote_code,
            student.chat_template,
            teacher.max_model_len,
            {"chosen": teacher.sampling.stop, "rejected": student.sampling.stop},
        )
        rows_per_file = parquet.rows_per_file(todo, teacher.batch_size)
        if teacher.endpoint is not None:
            endpoint = write_from_endpoint(
                lambda stats: scores_http(sequences.map(ids), teacher, stats),
                uri,
                schemas.SCORE_SCHEMA,
                rows_per_file,
                f"{expected} teacher scores",
            )
        else:
            scored = teacher_scores(sequences, ids, teacher, inputs.teacher_path, run.use_gpu)
            with engines.engine_deaths("teacher", teacher):
                parquet.write_pending(scored, uri, schemas.SCORE_SCHEMA, rows_per_file)
    tokens = parquet.pending_sum(uri, "num_tokens", earlier)
    prefill = tokens + parquet.pending_sum(uri, "prompt_tokens", earlier)
    rows = parquet.commit(uri, {"teacher_model": teacher.model, "top_k": k}, teacher_logprobs.KEYS, log)
    seconds = time.perf_counter() - start
    on_disk = _file_bytes(uri)
    all_tokens = parquet.read(uri).sum("num_tokens") or 0
    per_token = teacher_logprobs.bytes_per_token(on_disk, all_tokens)
    log(
        f"[generate] teacher scores: {rows} sequences ({todo} now: {prefill} prefill tokens, {tokens} of them "
        f"scored) in {seconds:.1f}s ({prefill / seconds:.0f} prefill tokens/s incl. start-up); {on_disk} bytes, "
        f"{per_token:.1f} bytes per scored token (top {k}) -> {uri}"
    )
    figures = {
        "scored_sequences": rows,
        "scored_now": todo,
        "scoring_prefill_tokens": prefill,
        "scored_tokens": tokens,
        "scoring_seconds": seconds,
        "scores_bytes": on_disk,
        "scores_bytes_per_token": per_token,
        "score_top_k": k,
    }
    if endpoint is not None:
        log(
            f"[generate] teacher scoring endpoint: {endpoint['requests']} requests, {endpoint['retries']} retries, "
            f"{endpoint['throttled']} throttled, {endpoint['outage_s']:.1f} s down; usage {endpoint['prompt_tokens']} "
            "prompt tokens"
        )
        figures["scoring_endpoint"] = endpoint
    return figures


def _to_score(pairs_ds, done_ds, num_partitions: int):
    """pairs -> one row per (id, sample_index, side) sequence not in `done_ds`."""
    return not_done(
        pairs_ds.flat_map(teacher_logprobs.scoring_sequences), done_ds, tuple(teacher_logprobs.KEYS), num_partitions
    )


def _file_bytes(uri: str) -> int:
    fs, _ = storage.filesystem_and_path(uri)
    paths = [storage.filesystem_and_path(f)[1] for f in parquet.files(uri) or []]
    return sum(info.size for info in fs.get_file_info(paths))


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


class SequenceIds:
    """A sequence to score (id, sample_index, side, prompt, text, finish_reason, generated_ids) -> the ids to
    prefill: the one the student trains on, its tokenizer's prompt (with its chat template when on) and the
    response's ids as generated (plad_ray.pairs.response_ids; `stops`: each side's sampling.stop, for
    a response that a stop string ended and that carries no ids), cut to `max_model_len`."""

    def __init__(
        self, student_path: str, trust_remote_code: bool, chat_template: bool, max_model_len: int, stops: dict
    ):
        self.student_path, self.trust_remote_code, self.chat_template = student_path, trust_remote_code, chat_template
        self.max_model_len, self.stops = max_model_len, stops

    def __call__(self, row: dict) -> dict:
        from plad_ray.pairs import response_ids

        tokenizer = _tokenizer(self.student_path, self.trust_remote_code)
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        prompt = prompt_token_ids(tokenizer, [row["prompt"]], self.chat_template)[0]
        response = response_ids(
            row["generated_ids"], row["text"], row["finish_reason"], encode, eos, self.stops[row["side"]]
        )
        prompt, response = teacher_logprobs.fit(list(prompt), list(response), self.max_model_len)
        return {
            "id": row["id"],
            "sample_index": row["sample_index"],
            "side": row["side"],
            "prompt_len": len(prompt),
            "tokenized_prompt": prompt + response,
        }


def teacher_scores(sequences_ds, ids: SequenceIds, engine: EngineConfig, teacher_path: str, use_gpu: bool):
    """Sequences to score -> rows of SCORE_SCHEMA, from the teacher's vLLM engines (ray.data.llm)."""
    k = engine.score_top_k
    params = {**scoring_params(k), "detokenize": False}  # vLLM's SamplingParams: no text of the one sampled token

    def preprocess(row: dict) -> dict:
        return {**ids(row), "sampling_params": params}

    def postprocess(row: dict) -> dict:
        read = teacher_logprobs.read_prompt_logprobs(
            row["prompt_logprobs"], list(row["prompt_token_ids"]), int(row["prompt_len"]), k
        )
        return {"id": row["id"], "sample_index": int(row["sample_index"]), "side": row["side"], **read}

    processor = engines.build_engine_processor(
        engine, teacher_path, use_gpu, preprocess, postprocess, chat_template=False
    )
    return processor(sequences_ds)
