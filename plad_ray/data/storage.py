"""Paths and URIs on any pyarrow filesystem, and outputs that only look complete when they are.

A folder the run produces is complete when its `_manifest.json`, written last, exists;
readers trust only folders with a manifest. Single-shot outputs (the model export) are
copied into place file by file, the manifest last (`publish`): object stores cannot move
a folder (S3 copies and deletes object by object), so nothing here moves one. Streamed
datasets commit their files from `<name>.partial` (see `parquet`). JSON files are
written to a temporary name and moved.
"""

import json
import os
import uuid

import pyarrow.fs as pafs

MANIFEST = "_manifest.json"


def is_uri(path: str) -> bool:
    """A URI with a scheme (s3://, gs://, hdfs://, file://, ...) rather than a local path."""
    return "://" in path


def absolute(path: str | None) -> str | None:
    """A local path made absolute (user folder expanded); URIs and None unchanged."""
    return path if not path or is_uri(path) else os.path.abspath(os.path.expanduser(path))


def job_working_dir(environ=os.environ) -> bool:
    """Whether this process is a `ray job submit` driver started in Ray's copy of the job's `working_dir`
    (the job supervisor hands the driver its runtime env in RAY_JOB_CONFIG_JSON_ENV_VAR). That copy lives
    in the cluster's temporary session folder, a cache Ray may clear: no place for a run's outputs."""
    raw = environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return False
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return False
    return bool(runtime_env.get("working_dir"))


def output_root(output_dir: str, storage_root: str, in_job_copy: bool) -> str:
    """Where a run's outputs go: a URI or absolute path as given; a relative path against the launch directory,
    except in a job's working_dir copy (`in_job_copy`), where it is taken under `storage_root` (cluster.storage)."""
    if is_uri(output_dir) or os.path.isabs(os.path.expanduser(output_dir)) or not in_job_copy:
        return absolute(output_dir)
    return join(storage_root, output_dir) if is_uri(storage_root) else absolute(os.path.join(storage_root, output_dir))


def filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or any URI pyarrow understands."""
    if is_uri(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def local_path(uri: str) -> str:
    """A model folder the engines can open: the path of a local/file:// URI; other URIs unchanged
    (vLLM and transformers then need a shared filesystem mount or their own URI support)."""
    if not is_uri(uri):
        return os.path.abspath(uri)
    return uri[len("file://") :] if uri.startswith("file://") else uri


def list_files(fs: pafs.FileSystem, path: str, uri: str) -> list[str]:
    """The file itself, or the data files under a folder (sorted); [] if nothing is there."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type != pafs.FileType.Directory:
        return []
    selector = pafs.FileSelector(path, recursive=True)
    return sorted(
        f.path
        for f in fs.get_file_info(selector)
        if f.type == pafs.FileType.File
        and f.path.endswith((".jsonl", ".json", ".parquet"))
        and not os.path.basename(f.path).startswith(("_", "."))
    )


def exists(uri: str) -> bool:
    fs, path = filesystem_and_path(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_json(uri: str) -> dict | None:
    fs, path = filesystem_and_path(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file under a temporary name, then move it into place."""
    fs, path = filesystem_and_path(uri)
    fs.create_dir(os.path.dirname(path), recursive=True)
    tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def write_json(uri: str, data: dict) -> None:
    write_text(uri, json.dumps(data, indent=2, sort_keys=True, default=str))


def publish(local_dir: str, final: str, manifest: dict) -> None:
    """Copy a finished local folder to `final` (a path or URI) file by file, then write its manifest, the mark
    readers trust. A folder already at `final` (an earlier export) loses its manifest first: a crash in between
    leaves a folder without one, which no reader takes for complete, and the next run writes it again."""
    remove(join(final, MANIFEST))
    remove(final)
    copy_local_dir(local_dir, final)
    write_json(join(final, MANIFEST), manifest)


def manifest(uri: str) -> dict | None:
    """The manifest of a complete output folder, or None if it is missing or partial."""
    return read_json(join(uri, MANIFEST))


def remove(uri: str) -> None:
    fs, path = filesystem_and_path(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def copy_local_dir(local_dir: str, uri: str) -> None:
    """Upload a local folder to `uri` (any pyarrow filesystem)."""
    fs, path = filesystem_and_path(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
