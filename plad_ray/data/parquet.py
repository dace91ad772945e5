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
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from plad_ray.data import storage
from plad_ray.errors import DataError

JOIN_ROWS_PER_PARTITION = 1_000_000  # rows per hash partition of a Ray Data join against the keys on disk
MAX_ROWS_PER_FILE = (
    16_384  # a file holds at least 1/64 of a write and one engine batch, at most this (see rows_per_file)
)


def rows_per_file(rows: int, batch_size: int) -> int:
    """Rows per written file: few files for a big write (a 1M-row write in ~64 files, not one per engine
    batch: reading back thousands of small files is slow), yet a crash loses at most MAX_ROWS_PER_FILE rows
    of work (rows buffered for a file not yet written are generated again on resume)."""
    return max(batch_size, min(rows // 64, MAX_ROWS_PER_FILE))


def pending_uri(uri: str) -> str:
    return uri.rstrip("/") + ".partial"


def _cast(schema: pa.Schema):
    def cast(table: pa.Table) -> pa.Table:
        return table.select(schema.names).cast(schema)

    return cast


def write_pending(ds, uri: str, schema: pa.Schema, min_rows_per_file: int | None = None) -> None:
    """Stream a Ray Dataset's rows into the pending part of the dataset at `uri` (`rows_per_file`)."""
    ds.map_batches(_cast(schema), batch_format="pyarrow").write_parquet(
        pending_uri(uri), min_rows_per_file=min_rows_per_file
    )


class WritePending:
    """A Ray Data stage that writes each block it passes into the pending part of the dataset at `uri` and
    hands the block on (train.stream: the pairs are on disk before a trainer reads them). A block's file is
    named by its first key and row count, so a block Ray Data computes again overwrites its own file."""

    def __init__(self, uri: str, schema: pa.Schema, keys: list[str]):
        self.uri, self.schema, self.keys = uri, schema, keys

    def __call__(self, table: pa.Table) -> pa.Table:
        import hashlib

        if table.num_rows == 0:
            return table
        table = _cast(self.schema)(table)
        first = "#".join(str(table.column(k)[0].as_py()) for k in self.keys)
        name = hashlib.sha256(f"{first}:{table.num_rows}".encode()).hexdigest()[:24]
        fs, path = storage.filesystem_and_path(pending_uri(self.uri))
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path}/.{name}.tmp") as out:  # no half-written file under its final name
            pq.write_table(table, out)
        fs.move(f"{path}/.{name}.tmp", f"{path}/stream-{name}.parquet")
        return table


FILES_PER_TASK = 256  # files one Ray task checks or moves when a dataset has more (see `_each_file`)


def _each_file(work, fs, items: list) -> list:
    """`work(fs, items)` (a list in, a list out) over `items`, in Ray tasks of FILES_PER_TASK items when there are
    more than that and Ray is up: a stream of 200M pairs is ~12k files, and one footer read or one move at a time
    on the driver is hours on object storage (a move there is a copy and a delete)."""
    chunks = [items[i : i + FILES_PER_TASK] for i in range(0, len(items), FILES_PER_TASK)]
    import ray

    if len(chunks) <= 1 or not ray.is_initialized():
        return work(fs, items)
    task = ray.remote(num_cpus=0, max_retries=3)(work)  # I/O; a lost task is run again (each step is idempotent)
    return [out for part in ray.get([task.remote(fs, chunk) for chunk in chunks]) for out in part]


def _footers(fs, files: list[str]) -> list[tuple[str, bool]]:
    """(file, readable) for each file; a file cut off mid-write (no Parquet footer) is deleted."""
    out = []
    for file in files:
        try:
            pq.read_metadata(file, filesystem=fs)
            out.append((file, True))
        except (pa.ArrowInvalid, OSError):
            fs.delete_file(file)
            out.append((file, False))
    return out


def _moves(fs, moves: list[tuple[str, str]]) -> list[str]:
    for src, dst in moves:
        _move(fs, src, dst)
    return [dst for _, dst in moves]


def _pending_files(uri: str, log=print) -> list[str]:
    """Readable pending files; files cut off mid-write (no Parquet footer) are deleted."""
    fs, path = storage.filesystem_and_path(pending_uri(uri))
    files = [f for f in storage.list_files(fs, path, pending_uri(uri)) if f.endswith(".parquet")]
    readable = []
    for file, ok in _each_file(_footers, fs, files):
        if ok:
            readable.append(file)
        else:
            log(f"[plad-ray] deleted {file}: cut off mid-write by an earlier run; its rows will be generated again")
    return readable


def _committed_paths(uri: str, manifest: dict | None) -> list[str]:
    """Filesystem paths of the files a manifest lists (none without one)."""
    return [storage.filesystem_and_path(storage.join(uri, name))[1] for name in (manifest or {"files": []})["files"]]


def _orphans(uri: str, manifest: dict | None) -> list[str]:
    """Files in the dataset's folder that its manifest does not list: moved there by a commit
    that crashed before writing its manifest (only readable pending files are ever moved)."""
    fs, dst = storage.filesystem_and_path(uri)
    listed = set(_committed_paths(uri, manifest))
    return [f for f in storage.list_files(fs, dst, uri) if f.endswith(".parquet") and f not in listed]


def _uncommitted_files(uri: str, log=print) -> list[str]:
    """Rows written but not committed: readable pending files, then files an interrupted commit moved."""
    return _pending_files(uri, log) + _orphans(uri, storage.manifest(uri))


def written_files(uri: str, log=print) -> list[str]:
    """Filesystem paths of every file of rows already written, committed or not."""
    return _committed_paths(uri, storage.manifest(uri)) + _uncommitted_files(uri, log)


def read_dataset(paths, **kwargs):
    """`ray.data.read_parquet`, without the progress bar of its footer sampling.

    Ray Data's first Parquet datasource (plad_ray.cluster.configure_data) samples a few files while the
    read is set up and draws a bar for it, which a terminal that is not a TTY (a log, `ray job submit`)
    gets as two lines per read, about ten reads per run. The dataset keeps the caller's progress setting.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    shown = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        ds = ray.data.read_parquet(paths, **kwargs)
    finally:
        context.enable_progress_bars = shown
    ds.context.enable_progress_bars = shown
    return ds


def _dataset(uri: str, paths: list[str], columns: list[str] | None = None):
    fs, _ = storage.filesystem_and_path(uri)
    ds = read_dataset(paths, filesystem=fs)
    return ds if columns is None else ds.select_columns(columns)


def done_keys_dataset(uri: str, columns: list[str], log=print):
    """Key columns of every row already written, committed or not, as a Ray Dataset read by Ray's tasks
    (None when nothing is written): for anti-joins, without the keys passing through the driver."""
    paths = written_files(uri, log)
    return _dataset(uri, paths, columns) if paths else None


def written_rows(uri: str) -> int:
    """Rows already written, committed or not (from the files' footers): what a failed run leaves safe."""
    fs, _ = storage.filesystem_and_path(uri)
    return sum(pq.read_metadata(path, filesystem=fs).num_rows for path in written_files(uri, log=lambda _: None))


def uncommitted_files(uri: str) -> list[str]:
    """The files of rows written but not yet committed (pending, or moved in by an interrupted commit)."""
    return _uncommitted_files(uri, log=lambda _: None)


def pending_sum(uri: str, column: str, written_before: list[str] = ()) -> int:
    """Sum of a column over the uncommitted rows not in `written_before`: e.g. tokens generated by
    this run (pass `uncommitted_files` from before it wrote; an earlier run's rows do not count).
    Summed by Ray Data."""
    earlier = set(written_before)
    paths = [p for p in uncommitted_files(uri) if p not in earlier]
    return int(_dataset(uri, paths, [column]).sum(column) or 0) if paths else 0


def _check_unique(uri: str, paths: list[str], keys: list[str]) -> None:
    """DataError naming the first key the files hold twice, before anything is committed (a Ray Data
    group-by: the keys never pass through the driver)."""
    if not paths:
        return
    ds = _dataset(uri, paths, keys)
    partitions = 1 + ds.count() // JOIN_ROWS_PER_PARTITION  # the count is the files' footers
    twice = ds.groupby(keys, num_partitions=partitions).count().filter(expr=_more_than_once()).materialize()
    n = twice.count()
    if n:
        first = {k: v for k, v in twice.sort(keys).take(1)[0].items() if k in keys}
        raise DataError(
            f"{uri}: {n} key(s) written twice, e.g. {first}: nothing committed; another run may be "
            f"writing to the same output_dir (one run per output_dir), or remove {pending_uri(uri)} and re-run"
        )


def _more_than_once():
    from ray.data.expressions import col

    return col("count()") > 1


def commit(uri: str, info: dict, keys: list[str], log=print) -> int:
    """Move uncommitted files into the dataset and write its manifest (the commit point); its total rows.

    Refuses (DataError, nothing committed) when a key of `keys` would be in the dataset twice."""
    manifest = storage.manifest(uri)
    existing = manifest or {"files": [], "rows": 0}
    fs, dst = storage.filesystem_and_path(uri)
    _, src = storage.filesystem_and_path(pending_uri(uri))
    pending, orphans = _pending_files(uri, log), _orphans(uri, manifest)
    _check_unique(uri, _committed_paths(uri, manifest) + pending + orphans, keys)
    if orphans:
        log(f"[plad-ray] {uri}: committing {len(orphans)} file(s) an interrupted commit had moved in")
    fs.create_dir(dst, recursive=True)
    rows = _dataset(uri, orphans + pending).count() if orphans or pending else 0  # from the files' footers
    added = [os.path.relpath(file, dst) for file in orphans]
    names = [os.path.relpath(file, src) for file in pending]
    there = set(_committed_paths(uri, manifest)) | set(orphans)
    clash = next((name for name in names if f"{dst}/{name}" in there), None)
    if clash is not None:
        raise DataError(
            f"{uri}: {clash} is both pending and in the dataset: nothing committed; "
            f"remove {pending_uri(uri)} and re-run"
        )
    _each_file(_moves, fs, [(file, f"{dst}/{name}") for file, name in zip(pending, names)])  # one move per file
    added += names
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


def require_columns(uri: str, columns, what: str, fix: str = "delete it to make it again") -> None:
    """Stop with one line when the complete dataset at `uri` lacks a column its reader needs (a folder written by
    another version of plad-ray, or by hand), before any stage reads it; a dataset not complete yet is not checked.
    `what` names the dataset in the line, `fix` says what to do."""
    paths = files(uri)
    if not paths:
        return
    fs, _ = storage.filesystem_and_path(uri)
    have = set(pq.read_schema(storage.filesystem_and_path(paths[0])[1], filesystem=fs).names)
    missing = [c for c in columns if c not in have]
    if missing:
        raise DataError(
            f"{what} {uri}: no {', '.join(missing)} column{'s' if len(missing) > 1 else ''} (its columns: "
            f"{', '.join(sorted(have))}); {fix}"
        )


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table | None:
    """A complete dataset as one Arrow table, read by this process (tests and benchmarks; the stages read
    through Ray Data: `read`)."""
    paths = files(uri)
    if paths is None:
        return None
    fs, _ = storage.filesystem_and_path(uri)
    tables = [pq.read_table(storage.filesystem_and_path(p)[1], columns=columns, filesystem=fs) for p in paths]
    return pa.concat_tables(tables) if tables else None


def read(uri: str):
    """A complete dataset as a Ray Dataset."""
    paths = files(uri)
    if paths is None:
        return None
    return read_dataset(paths)
