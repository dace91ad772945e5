"""Parquet datasets the run writes (teacher cache, pairs), complete or invisible.

A dataset folder is complete when its `_manifest.json` exists; the manifest lists its
files, so readers never see a file of an unfinished write, and an append (new teacher
outputs for new prompts) becomes visible in one manifest replace.
"""

import os

import pyarrow as pa
import pyarrow.parquet as pq

from plad_ray.data import storage


def _cast(schema: pa.Schema):
    def cast(table: pa.Table) -> pa.Table:
        return table.select(schema.names).cast(schema)

    return cast


def _written_files(partial: str) -> list[tuple[str, int]]:
    fs, path = storage.filesystem_and_path(partial)
    out = []
    for file in storage.list_files(fs, path, partial):
        if file.endswith(".parquet"):
            out.append((os.path.relpath(file, path), pq.read_metadata(file, filesystem=fs).num_rows))
    return out


def write(ds, uri: str, schema: pa.Schema, info: dict) -> int:
    """Write a Ray Dataset as the complete dataset at `uri` (replacing any); returns rows."""
    partial = storage.partial_uri(uri)
    ds.map_batches(_cast(schema), batch_format="pyarrow").write_parquet(partial)
    files = _written_files(partial)
    rows = sum(n for _, n in files)
    storage.publish(partial, uri, {**info, "files": [f for f, _ in files], "rows": rows})
    return rows


def append(ds, uri: str, schema: pa.Schema, info: dict) -> int:
    """Add a Ray Dataset's rows to the dataset at `uri` (creating it); returns rows added."""
    existing = storage.manifest(uri)
    if existing is None:
        return write(ds, uri, schema, info)
    partial = storage.partial_uri(uri)
    ds.map_batches(_cast(schema), batch_format="pyarrow").write_parquet(partial)
    fs, src = storage.filesystem_and_path(partial)
    _, dst = storage.filesystem_and_path(uri)
    added = _written_files(partial)
    for name, _ in added:
        fs.move(f"{src}/{name}", f"{dst}/{name}")
    fs.delete_dir(src)
    rows = sum(n for _, n in added)
    storage.write_json(
        storage.join(uri, storage.MANIFEST),
        {**existing, **info, "files": existing["files"] + [f for f, _ in added], "rows": existing["rows"] + rows},
    )
    return rows


def files(uri: str) -> list[str] | None:
    """Full paths of a complete dataset's files; None if `uri` holds no complete dataset."""
    manifest = storage.manifest(uri)
    if manifest is None:
        return None
    return [storage.join(uri, name) for name in manifest["files"]]


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table | None:
    """A complete dataset as one Arrow table, read by this process (for small columns like ids)."""
    paths = files(uri)
    if paths is None:
        return None
    fs, _ = storage.filesystem_and_path(uri)
    tables = [pq.read_table(storage.filesystem_and_path(p)[1], columns=columns, filesystem=fs) for p in paths]
    return pa.concat_tables(tables) if tables else None


def read(uri: str):
    """A complete dataset as a Ray Dataset."""
    import ray.data

    paths = files(uri)
    if paths is None:
        return None
    return ray.data.read_parquet(paths)
