"""Joining a Ray cluster, or starting a local one when none is given."""

import os
import time

from plad_ray.config import ClusterConfig, Config, EngineConfig
from plad_ray.errors import ConfigError

# CPUs kept free while trainer workers run, for the Ray Data tasks that feed them;
# without them the workers hold every CPU and the data stage never gets scheduled.
DATA_CPUS = 1.0
# Each pair tokenizer actor's CPUs (up to one actor per trainer worker, plad_ray.train.prepare.tokenize). With
# train.stream they hold them beside the engines, the trainer and Ray Data's tasks.
TOKENIZER_CPUS = 0.5
# Idle worker processes a local cluster keeps (Ray's `num_workers_soft_limit`; its default is the node's
# *available* CPUs, so 4 logical CPUs, fewer while engines or trainer workers hold some). Ray kills idle
# workers past that limit after 1 s, and each stage of a run then starts and imports new Python processes
# (3-4 s each on 2 cores): keeping 16 took `jobs.train`'s data preparation on the demo's 2,048 pairs
# from 24.8 s to 16.0 s.
LOCAL_IDLE_WORKERS = 16


def raylet_env(num_cpus: int | None = None) -> dict[str, str]:
    """The Ray settings plad-ray starts its local cluster with (the raylet reads them from its environment):
    LOCAL_IDLE_WORKERS idle workers kept (above)."""
    return {"RAY_num_workers_soft_limit": str(max(LOCAL_IDLE_WORKERS, num_cpus or 0))}


_ray_processes = None  # the processes ray.init started for the local cluster this process runs (None: none)


def shutdown(grace_s: float = 5.0) -> None:
    """Disconnect from Ray. A local cluster this process started ends with it, and so does everything below it:
    Ray stops its own processes, but a vLLM engine's `VLLM::EngineCore` outlives its actor when the raylet goes
    first (a Ctrl-C, a failed run: 1 GB each for the tiny models, the model's memory for real ones). Whatever
    of Ray's process tree is still alive `grace_s` after Ray's shutdown is killed; other children of this
    process (W&B's service, which still has to flush at exit) are left alone."""
    global _ray_processes
    import ray

    if not ray.is_initialized():
        return
    if _ray_processes is None:
        ray.shutdown()
        return
    import psutil  # (vLLM's and Ray's dependency) only for a cluster this process started

    below = []
    for root in _ray_processes:
        try:
            below += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    ray.shutdown()
    _ray_processes = None
    _, alive = psutil.wait_procs(below, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def connect(cluster: ClusterConfig) -> str:
    """Join cluster.address (or $RAY_ADDRESS, as `ray job submit` sets), else start a local cluster.

    A local cluster gets `address="local"` so it never attaches to someone else's Ray
    on the same machine, and `num_cpus` logical CPUs: on a 2-core machine, Ray Data
    stages, vLLM engines and trainer workers need more logical CPUs than cores to
    be scheduled at the same time.
    """
    global _ray_processes
    import ray

    from plad_ray import console

    console.route_libraries()  # Ray set up its loggers when imported; ray.init logs through them
    if ray.is_initialized():
        return "already connected"
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        said = f"joined Ray cluster at {address}"
    else:
        for name, value in raylet_env(cluster.num_cpus).items():
            os.environ.setdefault(name, value)  # a value the user set wins
        import psutil

        before = {p.pid for p in psutil.Process().children()}
        ray.init(address="local", num_cpus=cluster.num_cpus, include_dashboard=False)
        _ray_processes = [p for p in psutil.Process().children() if p.pid not in before]  # Ray's, started now
        said = f"started a local Ray cluster ({ray.cluster_resources().get('CPU', 0):g} logical CPUs)"
    console.forward_worker_logs()  # worker logs to the run's log file; plad-ray's own lines to the terminal
    console.route_libraries()
    return said


def check_resources(
    cfg: Config, available: dict, generation: bool = True, training: bool = True, nodes: list[dict] | None = None
) -> None:
    """Refuse a plan the cluster cannot place (it would wait forever instead of failing).

    Generation stages run one after another, then training; each must fit on its own, except that with
    train.stream the student engines and the trainer run at once. `nodes`: each node's resources (default: one
    node with all of `available`); an engine replica's workers (vLLM tensor parallelism) and a trainer worker each
    need one node that holds them whole, whatever the totals say.
    """
    cpus, gpus = available.get("CPU", 0.0), available.get("GPU", 0.0)
    nodes = nodes or [available]
    where = f"the cluster has {cpus:g} CPUs and {gpus:g} GPUs"
    for role in ("teacher", "student") if generation else ():
        engine: EngineConfig = getattr(cfg, role)
        if getattr(engine, "endpoint", None) is not None:  # only a teacher has one
            continue  # HTTP request workers reserve no CPU (generate.endpoint.REQUEST_WORKER_CPUS)
        workers = engine.replicas * engine.tensor_parallel_size
        if workers * engine.cpus_per_replica > cpus:
            raise ConfigError(
                f"config key {role}.replicas: {engine.replicas} replicas x {engine.tensor_parallel_size} workers x "
                f"{engine.cpus_per_replica:g} CPUs do not fit ({where}); lower {role}.replicas or "
                f"{role}.cpus_per_replica, or add cluster.num_cpus"
            )
        if cfg.cluster.use_gpu and workers * engine.gpus_per_worker > gpus:
            share = f" x {engine.gpus_per_worker:g} GPUs" if engine.gpus_per_worker != 1 else ""
            raise ConfigError(
                f"config key {role}.replicas: {engine.replicas} replicas x TP {engine.tensor_parallel_size}{share} "
                f"need {workers * engine.gpus_per_worker:g} GPUs ({where}); lower {role}.replicas or "
                f"{role}.tensor_parallel_size"
            )
        _check_replicas_per_node(cfg, role, engine, nodes)
    t = cfg.train
    if not training:
        return
    if generation and t.stream:
        _check_together(cfg, cpus, gpus, where)
    if t.num_workers * t.cpus_per_worker + DATA_CPUS > cpus:
        raise ConfigError(
            f"config key train.num_workers: {t.num_workers} workers x {t.cpus_per_worker:g} CPUs plus "
            f"{DATA_CPUS:g} CPU for the data feeding them do not fit ({where}); lower train.num_workers or "
            "train.cpus_per_worker, or raise cluster.num_cpus"
        )
    if cfg.cluster.use_gpu and t.num_workers > gpus:
        raise ConfigError(f"config key train.num_workers: {t.num_workers} workers need {t.num_workers} GPUs ({where})")
    worker = {"CPU": t.cpus_per_worker, **({"GPU": 1.0} if cfg.cluster.use_gpu else {})}
    if sum(_fits(node, worker) for node in nodes) < t.num_workers:
        raise ConfigError(
            f"config key train.num_workers: {t.num_workers} workers of {_shown(worker)} each do not fit on the "
            f"cluster's nodes ({_nodes_shown(nodes)}): a worker needs one node that holds it; lower "
            "train.num_workers or train.cpus_per_worker"
        )


def replica_bundle(engine: EngineConfig, use_gpu: bool) -> dict:
    """What one engine replica reserves on one node: its tensor_parallel_size workers together."""
    tp = engine.tensor_parallel_size
    return {"CPU": tp * engine.cpus_per_replica, **({"GPU": tp * engine.gpus_per_worker} if use_gpu else {})}


def _fits(node: dict, bundle: dict) -> int:
    """How many copies of `bundle` one node holds."""
    return int(min(node.get(k, 0.0) / v for k, v in bundle.items() if v > 0) + 1e-9)


def _shown(bundle: dict) -> str:
    return " and ".join(f"{v:g} {k}s" for k, v in bundle.items())


def _nodes_shown(nodes: list[dict]) -> str:
    return "; ".join(f"{n.get('CPU', 0.0):g} CPUs, {n.get('GPU', 0.0):g} GPUs" for n in nodes)


def _check_replicas_per_node(cfg: Config, role: str, engine: EngineConfig, nodes: list[dict]) -> None:
    """A replica's workers are placed together on one node (STRICT_PACK: tensor parallelism runs over the node's
    own links), so each replica must fit a node, and the nodes together must hold every replica."""
    bundle = replica_bundle(engine, cfg.cluster.use_gpu)
    placed = [_fits(node, bundle) for node in nodes]
    if not any(placed):
        raise ConfigError(
            f"config key {role}.tensor_parallel_size: one replica's {engine.tensor_parallel_size} worker(s) need "
            f"{_shown(bundle)} on one node, and no node has that ({_nodes_shown(nodes)}); lower "
            f"{role}.tensor_parallel_size or {role}.cpus_per_replica"
        )
    if sum(placed) < engine.replicas:
        raise ConfigError(
            f"config key {role}.replicas: {engine.replicas} replicas of {_shown(bundle)} each, but the cluster's "
            f"nodes hold {sum(placed)} ({_nodes_shown(nodes)}): a replica cannot span nodes; lower {role}.replicas"
        )


def _check_together(cfg: Config, cpus: float, gpus: float, where: str) -> None:
    """train.stream: the student engines and the trainer workers (and the data between them) at once."""
    s, t = cfg.student, cfg.train
    engine_cpus = s.replicas * s.tensor_parallel_size * s.cpus_per_replica
    data_cpus = DATA_CPUS + TOKENIZER_CPUS * t.num_workers
    need = engine_cpus + t.num_workers * t.cpus_per_worker + data_cpus
    if need > cpus:
        raise ConfigError(
            f"config key train.stream: the student engines ({engine_cpus:g} CPUs), {t.num_workers} trainer workers x "
            f"{t.cpus_per_worker:g} CPUs and {data_cpus:g} CPUs for the data between them run at once and need "
            f"{need:g} CPUs ({where}); lower student.replicas or train.num_workers, raise cluster.num_cpus, or set "
            "train.stream=false"
        )
    engine_gpus = s.replicas * s.tensor_parallel_size * s.gpus_per_worker
    if cfg.cluster.use_gpu and engine_gpus + t.num_workers > gpus:
        raise ConfigError(
            f"config key train.stream: the student engines ({engine_gpus:g} GPUs) and {t.num_workers} trainer workers "
            f"run at once and need {engine_gpus + t.num_workers:g} GPUs ({where}); lower student.replicas or "
            "train.num_workers, or set train.stream=false"
        )


def local_resources(cluster: ClusterConfig) -> dict | None:
    """What a local cluster will have, or None when joining one (ask it after connecting)."""
    if cluster.address or os.environ.get("RAY_ADDRESS"):
        return None
    gpus = 0
    if cluster.use_gpu:
        import torch

        gpus = torch.cuda.device_count()
    return {"CPU": float(cluster.num_cpus or os.cpu_count() or 1), "GPU": float(gpus)}


def check_local(cfg: Config, generation: bool = True, training: bool = True) -> None:
    """Before a local cluster exists: refuse plans it could not place. No-op when joining one."""
    local = local_resources(cfg.cluster)
    if local is not None:
        check_resources(cfg, local, generation, training)


def start(cfg: Config, generation: bool = True, training: bool = True, log=print) -> None:
    """Connect; when joining a running cluster, check the plan against what it has."""
    import ray

    joining = local_resources(cfg.cluster) is None
    log(f"[plad-ray] {connect(cfg.cluster)}")
    configure_data()
    if joining:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        check_resources(cfg, ray.cluster_resources(), generation, training, nodes=nodes)
        check_output_visible(cfg.output_dir)


def configure_data() -> None:
    """Ray Data settings for every dataset this driver builds.

    Parquet is read through Ray Data's first datasource (`use_datasource_v2 = False`): the second one's
    footer indexer reads the footers in a nested Ray task, so every read waits for one more worker
    process to start and import Ray Data before its first row: 4-7 s per read on 2 cores (the demo reads
    Parquet about ten times), against 0.5-2 s. Both read the same files into the same rows."""
    from ray.data import DataContext

    DataContext.get_current().use_datasource_v2 = False


def check_output_visible(output_dir: str) -> None:
    """On a cluster of several nodes, a local output_dir must be one folder that every node sees (a shared
    mount): trainer workers write checkpoints there, and engines and tasks on any node read and write pairs.
    The driver writes a marker beside it and one zero-CPU task per alive node looks for it; a node that does
    not see it stops the run with one line. URIs are shared by construction."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from plad_ray.data import storage

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if storage.is_uri(output_dir) or len(nodes) < 2:
        return
    folder = _nearest_existing(output_dir)
    marker = os.path.join(folder, f".plad-ray-visible-{os.getpid()}-{time.time_ns()}")
    try:
        open(marker, "w").close()
    except OSError as e:
        raise ConfigError(
            f"config key output_dir: cannot write under {folder} ({e.strerror}); point output_dir "
            "(or cluster.storage) at a writable shared folder or URI"
        ) from e
    exists = ray.remote(num_cpus=0)(os.path.exists)
    try:
        seen = ray.get(
            [
                exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                    marker
                )
                for n in nodes
            ]
        )
    finally:
        os.remove(marker)
    blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise ConfigError(
            f"config key output_dir: {output_dir} is a local folder that {len(blind)} of the cluster's {len(nodes)} "
            f"nodes do not see ({', '.join(sorted(set(blind)))}); on a multi-node cluster point output_dir (or "
            "cluster.storage, for a relative one) at shared storage: a folder mounted on every node, or a URI such "
            "as s3://bucket/runs"
        )


def _nearest_existing(path: str) -> str:
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path
