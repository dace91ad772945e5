"""Model folders on object storage, made local where they are opened: downloaded once per node.

transformers, vLLM and DeepSpeed open local folders. A model folder given as a URI (`s3://`, `gs://`,
... : a teacher or student model, and, when output_dir is a URI, a round's exported student that the next
round samples and trains and the evaluation generates with) is copied to `cluster.model_cache` on every
alive node before a stage opens it, under a name that hashes the URI and the listing of its files
(names, sizes, modification times; not its model card): a folder rewritten under the same URI (a new export,
--overwrite) is fetched again, an unchanged one once per node. A copy is made under a temporary name and renamed when
complete, under a lock, so two processes of a node never fetch it twice or read half of it.

Written here rather than left to ray.data.llm, which downloads s3:// models for its own engines only: it
keys its cache by the URI (a student re-exported under the same URI would be served stale), logs and goes
on when a download fails, and nothing fetches the same folder for the trainer ranks and tokenizers.
"""

import hashlib
import json
import os
import shutil
import tempfile

from plad_ray.data import storage
from plad_ray.errors import DataError

DONE = ".plad-ray-fetched"  # written into a copy once all its files are there
# Files that describe the weights and are not part of their identity: the model card (plad_ray.model_card), which a
# run writes into an export after evaluating it and jobs.evaluate rewrites. A card alone does not refetch the weights.
NOT_IDENTITY = ("README.md",)


def is_remote(spec: str) -> bool:
    """A model folder on a remote filesystem (a URI other than file://): it must be fetched to be opened."""
    return storage.is_uri(spec) and not spec.startswith("file://")


def cache_folder(uri: str, cache_root: str) -> str:
    """The local folder a node keeps `uri`'s files in: cache_root/<folder name>-<hash of the URI and its files>."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem_and_path(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = sorted((os.path.relpath(i.path, path), i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    files = [f for f in files if f[0] not in NOT_IDENTITY]
    if not files:
        raise DataError(f"model folder {uri}: not found or empty; give a folder holding config.json, the tokenizer "
                        "and safetensors weights")
    key = hashlib.sha256(json.dumps([uri.rstrip("/"), files]).encode()).hexdigest()[:16]
    name = os.path.basename(path.rstrip("/")) or "model"
    return os.path.join(os.path.abspath(os.path.expanduser(cache_root)), f"{name}-{key}")


def fetch(uri: str, local: str) -> str:
    """Copy `uri`'s files to the folder `local` unless a finished copy is there; `local`."""
    import fcntl

    import pyarrow.fs as pafs

    if os.path.isfile(os.path.join(local, DONE)):
        return local
    parent = os.path.dirname(local)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise DataError(f"config key cluster.model_cache: cannot create {parent} ({e.strerror}); point it at a "
                        "writable local folder") from None
    with open(f"{local}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process of this node may be fetching it: wait for it
        if os.path.isfile(os.path.join(local, DONE)):
            return local
        partial = tempfile.mkdtemp(prefix=".partial-", dir=parent)
        try:
            fs, path = storage.filesystem_and_path(uri)
            pafs.copy_files(path, partial, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            open(os.path.join(partial, DONE), "w").close()
            shutil.rmtree(local, ignore_errors=True)  # an unfinished copy of an earlier process that died
            os.rename(partial, local)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return local


def local_model(spec: str, cache_root: str) -> str:
    """A folder transformers, vLLM and DeepSpeed can open on every node: a local path (or file:// URI) as it is;
    a remote URI fetched into every alive node's cache (one Ray task per node once Ray is up, else here)."""
    if not is_remote(spec):
        return storage.local_path(spec)
    local = cache_folder(spec, cache_root)
    import ray

    if not ray.is_initialized():
        return fetch(spec, local)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    fetch_task = ray.remote(num_cpus=0, max_retries=0)(fetch)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    try:
        ray.get([fetch_task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                 .remote(spec, local) for n in nodes])
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(e.cause, Exception) else e
        if isinstance(cause, DataError):
            raise cause from None
        raise DataError(f"model folder {spec}: could not be fetched to {local} on every node "
                        f"({type(cause).__name__}: {cause})") from None
    return local
