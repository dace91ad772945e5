"""Parquet datasets the run writes (teacher cache, pairs): complete, or pending and resumable.

    <name>.partial/   files written as generation streams (Ray Data appends here)
    <name>/           committed files + _manifest.json (written last) listing them

Readers of a complete dataset see only the manifest's files. A crashed or interrupted
run leaves `<name>.partial/`; the next run counts the rows of its readable files as
done, deletes files cut off mid-write, generates only the missing rows, then commits.
So every row is written exactly once across any number of interrupted runs.
"""

import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from plad_ray.data import storage


def pending_uri(uri: str) -> str:
    return uri.rstrip("/") + ".partial"


def _cast(schema: pa.Schema):
    def cast(table: pa.Table) -> pa.Table:
        return table.select(schema.names).cast(schema)

    return cast


def write_pending(ds, uri: str, schema: pa.Schema) -> None:
    """Stream a Ray Dataset's rows into the pending part of the dataset at `uri`."""
    ds.map_batches(_cast(schema), batch_format="pyarrow").write_parquet(pending_uri(uri))


def _pending_files(uri: str, log=print) -> list[str]:
    """Readable pending files; files cut off mid-write (no Parquet footer) are deleted."""
    fs, path = storage.filesystem_and_path(pending_uri(uri))
    readable = []
    for file in storage.list_files(fs, path, pending_uri(uri)):
        if not file.endswith(".parquet"):
            continue
        try:
            pq.read_metadata(file, filesystem=fs)
            readable.append(file)
        except (pa.ArrowInvalid, OSError):
            log(f"[plad-ray] deleting {file}: cut off mid-write by an earlier run; its rows will be generated again")
            fs.delete_file(file)
    return readable


def done_keys(uri: str, columns: list[str], log=print) -> pa.Table:
    """Key columns of every row already written, committed or pending."""
    fs, _ = storage.filesystem_and_path(uri)
    paths = [storage.filesystem_and_path(p)[1] for p in (files(uri) or [])] + _pending_files(uri, log)
    tables = [pq.read_table(p, columns=columns, filesystem=fs) for p in paths]
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(tables)


def pending_sum(uri: str, column: str) -> int:
    """Sum of a column over the pending (not yet committed) rows: e.g. tokens generated this run."""
    fs, _ = storage.filesystem_and_path(uri)
    return sum(pc.sum(pq.read_table(p, columns=[column], filesystem=fs).column(column)).as_py() or 0
               for p in _pending_files(uri, log=lambda _: None))


def commit(uri: str, info: dict, log=print) -> int:
    """Move pending files into the dataset and rewrite its manifest; returns its total rows."""
    existing = storage.manifest(uri) or {"files": [], "rows": 0}
    fs, dst = storage.filesystem_and_path(uri)
    _, src = storage.filesystem_and_path(pending_uri(uri))
    added, rows = [], 0
    pending = _pending_files(uri, log)
    if pending or not existing["files"]:
        fs.create_dir(dst, recursive=True)
    for file in pending:
        name = os.path.relpath(file, src)
        rows += pq.read_metadata(file, filesystem=fs).num_rows
        fs.move(file, f"{dst}/{name}")
        added.append(name)
    storage.write_json(
        storage.join(uri, storage.MANIFEST),
        {**existing, **info, "files": existing["files"] + added, "rows": existing["rows"] + rows},
    )
    if fs.get_file_info(src).type == pafs.FileType.Directory:
        fs.delete_dir(src)
    return existing["rows"] + rows


def files(uri: str) -> list[str] | None:
    """Full paths of a complete dataset's files; None if `uri` holds no complete dataset."""
    manifest = storage.manifest(uri)
    if manifest is None:
        return None
    return [storage.join(uri, name) for name in manifest["files"]]


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table | None:
    """A complete dataset as one Arrow table, read by this process."""
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
