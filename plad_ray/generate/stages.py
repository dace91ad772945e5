"""The two generation stages: teacher outputs (cached by prompt id), then student pairs.

    prompts --teacher engines--> teacher cache (id, prompt, teacher_text, ...)
    teacher cache --x k samples--> student engines --> pairs (prompt, chosen, rejected, ...)

The student stage reads the teacher cache rather than the prompts, so a later round
(a retrained student) regenerates only the student side: zero teacher tokens.
"""

from plad_ray import pairs
from plad_ray.config import EngineConfig, StudentEngineConfig
from plad_ray.data.prompts import engine_prompt
from plad_ray.generate.engines import build_engine_processor, sampling_params


class _ReadEngineRow:
    """What an engine row says about its generated text, read in postprocess."""

    def __init__(self, max_tokens: int, eos_token_ids: list[int]):
        self.max_tokens = max_tokens
        self.eos_token_ids = eos_token_ids

    def __call__(self, row: dict) -> dict:
        tokens = row["generated_tokens"]
        n = int(row["num_generated_tokens"])
        last = int(tokens[-1]) if n else None
        return {
            "text": row["generated_text"],
            "num_tokens": n,
            "finish_reason": pairs.finish_reason(n, self.max_tokens, last, self.eos_token_ids),
            "token_ids": [int(t) for t in tokens],
        }


def teacher_outputs(prompts_ds, engine: EngineConfig, model_path: str, model_name: str, eos_token_ids, use_gpu: bool):
    """prompts (id, prompt) -> rows of schemas.TEACHER_SCHEMA."""
    params = sampling_params(engine)
    params_json = pairs.sampling_json(params)
    read = _ReadEngineRow(engine.sampling.max_tokens, list(eos_token_ids))

    def preprocess(row: dict) -> dict:
        return {
            "source_prompt": row["prompt"],
            "sampling_params": params,
            **engine_prompt(row["prompt"], engine.chat_template),
        }

    def postprocess(row: dict) -> dict:
        out = read(row)
        return {
            "id": row["id"],
            "prompt": row["source_prompt"],
            "teacher_text": out["text"],
            "teacher_num_tokens": out["num_tokens"],
            "teacher_finish_reason": out["finish_reason"],
            "teacher_token_ids": out["token_ids"],
            "teacher_model": model_name,
            "teacher_sampling": params_json,
        }

    processor = build_engine_processor(engine, model_path, use_gpu, preprocess, postprocess)
    return processor(prompts_ds)


def teacher_outputs_http(prompts_ds, engine: EngineConfig, refused_uri: str, stats):
    """prompts (id, prompt) -> rows of schemas.TEACHER_SCHEMA, from an OpenAI-compatible endpoint; prompts the
    server refuses go to `refused_uri`, and what the workers saw to `stats` (plad_ray.generate.endpoint_worker)."""
    import ray.data

    from plad_ray.generate.endpoint import REQUEST_WORKER_CPUS
    from plad_ray.generate.endpoint_worker import EndpointWorker

    params = sampling_params(engine)
    worker_args = dict(
        engine=engine,
        params=params,
        model_name=f"{engine.model} @ {engine.endpoint.url}",
        params_json=pairs.sampling_json(params),
        quarantine_uri=refused_uri,
        stats=stats,
    )
    return prompts_ds.map_batches(
        EndpointWorker,
        fn_constructor_kwargs=worker_args,
        batch_size=engine.batch_size,
        batch_format="pyarrow",
        num_cpus=REQUEST_WORKER_CPUS,
        compute=ray.data.ActorPoolStrategy(size=engine.endpoint.concurrency),
    )


def samples_to_generate(teacher_ds, num_samples: int, done_ds=None, num_partitions: int = 1):
    """teacher cache rows -> one row per (prompt id, sample index) still to generate: k per prompt,
    less the keys in `done_ds` (an interrupted run's, `parquet.done_keys_dataset`), taken out by a
    Ray Data anti-join in `num_partitions` hash partitions, so no key passes through the driver."""
    expanded = teacher_ds.flat_map(lambda row: pairs.expand_samples(row, num_samples))
    return not_done(expanded, done_ds, ("id", "sample_index"), num_partitions)


def not_done(rows_ds, done_ds, keys: tuple[str, ...], num_partitions: int):
    """`rows_ds` less the rows whose `keys` are in `done_ds` (None: nothing done): a Ray Data anti-join."""
    if done_ds is None:
        return rows_ds
    done_ds = done_ds.map_batches(pairs.int64_sample_index, batch_format="pyarrow")  # the join hashes like types
    return rows_ds.join(done_ds, "left_anti", num_partitions=num_partitions, on=keys)


def student_pairs(
    samples_ds,
    engine: StudentEngineConfig,
    model_path: str,
    model_name: str,
    eos_token_ids,
    use_gpu: bool,
    heldout_fraction: float,
    shared_vocabulary: bool = False,
):
    """(teacher cache row, sample index) rows (`samples_to_generate`) -> student samples -> rows of
    schemas.PAIR_SCHEMA. With `shared_vocabulary` the teacher's generated ids are kept on the chosen side.
    """
    read = _ReadEngineRow(engine.sampling.max_tokens, list(eos_token_ids))
    params_by_sample = [sampling_params(engine, seed_offset=k) for k in range(engine.num_samples)]
    # The recorded sampling parameters are those of sample 0; sample k used seed + k.
    params_json = pairs.sampling_json({**params_by_sample[0], "seed_per_sample": "seed + sample_index"})

    def preprocess(row: dict) -> dict:
        return {
            "source_prompt": row["prompt"],
            "sampling_params": params_by_sample[int(row["sample_index"])],
            **engine_prompt(row["prompt"], engine.chat_template),
        }

    def postprocess(row: dict) -> dict:
        row = {**row, "prompt": row["source_prompt"]}
        return pairs.make_pair(row, read(row), model_name, params_json, heldout_fraction, shared_vocabulary)

    processor = build_engine_processor(engine, model_path, use_gpu, preprocess, postprocess)
    return processor(samples_ds)
