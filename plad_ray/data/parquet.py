"""Parquet datasets the run writes (teacher cache, pairs): complete, or pending and resumable.

    <name>.partial/   files written as generation streams (Ray Data appends here)
    <name>/           committed files + _manifest.json (written last) listing them

The manifest is the commit point: it is written last, in one atomic move, so a reader
of the manifest's files sees the old complete dataset or the new one, never a mix. A
crashed or interrupted run leaves `<name>.partial/`; the next run counts the rows of its
readable files as done, deletes files cut off mid-write, generates only the missing
rows, then commits. A commit that crashed after moving some files into `<name>/` but
before its manifest leaves files the manifest does not list: they are uncommitted rows,
counted as done and listed by the next commit (rolled forward). Commit refuses keys that
are already there. So every row is written exactly once across any number of
interrupted runs, and a key is never in the dataset twice.
"""

import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from plad_ray.data import storage
from plad_ray.errors import DataError


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


def _orphans(uri: str, existing: dict) -> list[str]:
    """Files in the dataset's folder that its manifest does not list: moved there by a commit
    that crashed before writing its manifest (only readable pending files are ever moved)."""
    fs, dst = storage.filesystem_and_path(uri)
    listed = {storage.filesystem_and_path(p)[1] for p in (files(uri) or [])} if existing["files"] else set()
    return [f for f in storage.list_files(fs, dst, uri) if f.endswith(".parquet") and f not in listed]


def _uncommitted_files(uri: str, log=print) -> list[str]:
    """Rows written but not committed: readable pending files, then files an interrupted commit moved."""
    return _pending_files(uri, log) + _orphans(uri, storage.manifest(uri) or {"files": []})


def _read_keys(fs, paths: list[str], columns: list[str]) -> pa.Table:
    tables = [pq.read_table(p, columns=columns, filesystem=fs) for p in paths]
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(tables)


def done_keys(uri: str, columns: list[str], log=print) -> pa.Table:
    """Key columns of every row already written, committed or not."""
    fs, _ = storage.filesystem_and_path(uri)
    paths = [storage.filesystem_and_path(p)[1] for p in (files(uri) or [])] + _uncommitted_files(uri, log)
    return _read_keys(fs, paths, columns)


def pending_sum(uri: str, column: str) -> int:
    """Sum of a column over the uncommitted rows: e.g. tokens generated this run."""
    fs, _ = storage.filesystem_and_path(uri)
    return sum(pc.sum(pq.read_table(p, columns=[column], filesystem=fs).column(column)).as_py() or 0
               for p in _uncommitted_files(uri, log=lambda _: None))


def check_unique(uri: str, keys: list[str], log=print) -> None:
    """DataError naming the first key written twice (committed or not), before anything is committed."""
    fs, _ = storage.filesystem_and_path(uri)
    table = done_keys(uri, keys, log)
    counts = table.group_by(keys).aggregate([([], "count_all")])
    twice = counts.filter(pc.greater(counts.column("count_all"), 1))
    if twice.num_rows:
        first = {k: twice.column(k)[0].as_py() for k in keys}
        raise DataError(
            f"{uri}: {twice.num_rows} key(s) written twice, e.g. {first}: nothing committed; another run may be "
            f"writing to the same output_dir (one run per output_dir), or remove {pending_uri(uri)} and re-run")


def commit(uri: str, info: dict, keys: list[str], log=print) -> int:
    """Move uncommitted files into the dataset and write its manifest (the commit point); its total rows.

    Refuses (DataError, nothing committed) when a key of `keys` would be in the dataset twice."""
    existing = storage.manifest(uri) or {"files": [], "rows": 0}
    fs, dst = storage.filesystem_and_path(uri)
    _, src = storage.filesystem_and_path(pending_uri(uri))
    check_unique(uri, keys, log)
    pending, orphans = _pending_files(uri, log), _orphans(uri, existing)
    if orphans:
        log(f"[plad-ray] {uri}: committing {len(orphans)} file(s) an interrupted commit had moved in")
    fs.create_dir(dst, recursive=True)
    added, rows = [], 0
    for file in orphans:
        added.append(os.path.relpath(file, dst))
        rows += pq.read_metadata(file, filesystem=fs).num_rows
    for file in pending:
        name = os.path.relpath(file, src)
        if fs.get_file_info(f"{dst}/{name}").type != pafs.FileType.NotFound:
            raise DataError(f"{uri}: {name} is both pending and in the dataset: nothing committed; "
                            f"remove {pending_uri(uri)} and re-run")
        rows += pq.read_metadata(file, filesystem=fs).num_rows
        _move(fs, file, f"{dst}/{name}")
        added.append(name)
    storage.write_json(  # the commit point: an atomic move of the whole manifest
        storage.join(uri, storage.MANIFEST),
        {**existing, **info, "files": existing["files"] + added, "rows": existing["rows"] + rows},
    )
    if fs.get_file_info(src).type == pafs.FileType.Directory:
        fs.delete_dir(src)
    return existing["rows"] + rows


def _move(fs, src: str, dst: str) -> None:
    fs.move(src, dst)  # its own function: the crash-injection tests interrupt a commit here


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
