"""The prompt stage: read, validate, number, de-duplicate and length-check the prompt source as
Ray Data operations over blocks, before any engine starts. The driver lists the files and
collects a few counts (one row per file, one per duplicated id); no prompt passes through it.

    files --read_file--> rows --number_rows--> --duplicates (groupby id)--> --LengthCheck--> checked
    checked: good rows -> the prompts the teacher answers; bad rows -> quarantine/prompts/ (JSON lines, each
             naming its file and line or row) or one error line

Every bad row stops the run under its policy's `error` (data.bad_rows for rows, data.too_long for
lengths; an unreadable file always), naming the first in source order.
"""

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from plad_ray.data import storage
from plad_ray.data.limits import LengthCheck, Limit
from plad_ray.data.parquet import JOIN_ROWS_PER_PARTITION
from plad_ray.data.prompts import (
    FORMATS,
    QUARANTINE_COLUMNS,
    display,
    error_line,
    mark_duplicates,
    number_rows,
    parquet_schema_problem,
    read_file,
)
from plad_ray.errors import DataError


@dataclass
class CheckedPrompts:
    prompts: object  # Ray Dataset: id, prompt, reference (a filter over the checked rows, which are materialised)
    count: int
    quarantine: object | None  # Ray Dataset of QUARANTINE_COLUMNS in source order; None when nothing is set aside
    quarantined: int
    truncated: int


def source_files(uri: str) -> list[str]:
    """The source's files (a listing, checked before Ray starts): missing or of an unknown format stops the run."""
    fs, path = storage.filesystem_and_path(uri)
    files = storage.list_files(fs, path, uri)
    if not files:
        raise DataError(f"prompt source {uri}: not found; point data.prompts at a .jsonl or .parquet file or folder")
    for f in files:
        if not f.endswith(FORMATS):
            raise DataError(
                f"prompt file {display(uri, f, path)}: unsupported format; "
                "use .jsonl (one JSON object per line) or .parquet"
            )
        if f.endswith(".parquet"):  # the schema is in the footer: --check reads it without reading the rows
            try:
                with fs.open_input_file(f) as handle:
                    problem = parquet_schema_problem(pq.read_schema(handle))
            except (pa.ArrowInvalid, OSError) as e:
                problem = f"not a readable Parquet file ({e})"
            if problem:
                raise DataError(f"prompt file {display(uri, f, path)}: {problem}")
    return files


def source_rows(uri: str, max_prompts: int | None = None):
    """The source's rows (prompts.ROW_SCHEMA) read and numbered by Ray tasks, one task per file: a lazy dataset.
    Numbering needs each file's row count first, so the files are read twice (once for the counts, once when the
    rows are used) rather than held in the object store between the two."""
    import ray.data

    fs, root = storage.filesystem_and_path(uri)
    files = source_files(uri)
    listing = ray.data.from_items(
        [{"file": i, "path": f, "shown": display(uri, f, root)} for i, f in enumerate(files)],
        override_num_blocks=len(files),
    )
    parsed = listing.map_batches(
        _read_files, fn_kwargs={"uri": uri}, batch_size=1, batch_format="pyarrow", **_on_this_node(fs)
    )
    per_file = _where(parsed, "parsed").groupby("file", num_partitions=1).aggregate(*_file_counts()).take_all()
    offsets, start = {}, 0
    for f in sorted(per_file, key=lambda r: r["file"]):
        offsets[f["file"]], start = start, start + f["rows"]
    name_ids = not any(f["ids"] for f in per_file)  # a source without any id: p<row>
    return parsed.map_batches(
        number_rows,
        fn_kwargs={"offsets": offsets, "name_ids": name_ids, "max_prompts": max_prompts, "source": uri},
        batch_format="pyarrow",
    )


def check_prompts(
    uri: str, max_prompts: int | None, bad_rows: str, too_long: str, limits: list[Limit], tokenizers: int = 1
) -> CheckedPrompts:
    """The prompt stage; raises DataError (one line) where a policy says error.

    One materialised copy of the source: the checked rows (good and bad, with their checks). The reads and checks
    before it stream; the prompts handed on and the rows set aside are filters over that one copy."""
    rows = source_rows(uri, max_prompts)
    read, first = _summary(rows)
    _stop_at_first(first, ("file",) if bad_rows == "quarantine" else ("file", "row"))
    valid = _where(rows, "parsed")
    partitions = 1 + sum(read[kind] for kind in ("good", *_BAD_KINDS)) // JOIN_ROWS_PER_PARTITION
    twice = valid.groupby("id", num_partitions=partitions).aggregate(*_id_counts())
    twice = twice.map_batches(_repeated, batch_format="pyarrow").materialize()
    if twice.count():
        valid = valid.join(
            twice.select_columns(["id", "first_row"]), "left_outer", num_partitions=partitions, on=("id",)
        )
        valid = valid.map_batches(mark_duplicates, fn_kwargs={"source": uri}, batch_format="pyarrow")
    if limits:
        # max_restarts=0: a restartable actor whose constructor arguments sit in the object store makes Ray's
        # core worker print an error line on the driver's terminal; a lost tokenizer actor fails the check.
        valid = valid.map_batches(
            LengthCheck,
            fn_constructor_args=(limits, too_long, uri),
            batch_format="pyarrow",
            concurrency=(1, max(1, tokenizers)),
            max_restarts=0,
        )
    checked = valid.union(_where(rows, "bad")).materialize()
    counts, first = _summary(checked)
    _stop_at_first(
        first, ("file",) + (("row",) if bad_rows == "error" else ()) + (("length",) if too_long == "error" else ())
    )
    quarantined = counts["file"] + counts["row"] + counts["length"]
    if counts["good"] == 0:
        if quarantined == 0:
            raise DataError(
                f"prompt source {uri}: has no rows; add prompts (one JSON object per line with a 'prompt' key)"
            )
        reason = min(first.values(), key=lambda r: (r["file"], r["line"]))["reason"]
        raise DataError(f"prompt source {uri}: no prompt is usable ({quarantined} set aside, first: {reason})")
    prompts = _where(checked, "parsed").select_columns(["id", "prompt", "reference"])
    quarantine = _where(checked, "bad").select_columns(QUARANTINE_COLUMNS) if quarantined else None
    return CheckedPrompts(prompts, counts["good"], quarantine, quarantined, counts["truncated"])


def check_cached_prompts(cached, prompts, source: str, cache: str) -> None:
    """Cached teacher outputs (`id`, `prompt`, a Ray Dataset) must answer the prompt text the source now
    gives their id. A row inserted into an id-less source shifts every later `p<row>` id, and a cached
    output would then be paired with another prompt; so any id whose text changed stops the run.

    A Ray Data join on id: no per-row work on the driver."""
    if cached is None:
        return
    now = prompts.select_columns(["id", "prompt"]).rename_columns({"prompt": "prompt_now"})
    changed = cached.select_columns(["id", "prompt"]).join(
        now, "inner", num_partitions=1 + prompts.count() // JOIN_ROWS_PER_PARTITION, on=("id",)
    )
    per_block = changed.map_batches(_text_changed, batch_format="pyarrow").take_all()  # one row per block
    n = sum(b["n"] for b in per_block)
    if n:
        first = min(b["first"] for b in per_block if b["n"])
        raise DataError(
            f"prompt source {source}: {n} prompt id(s) now name another text than their cached "
            f"teacher output in {cache} (first: {first!r}); give the prompts an `id` column that stays with "
            "their text, or use a new output_dir"
        )


def _on_this_node(fs) -> dict:
    """A local path is read on the driver's node (under `ray job submit`, the head), where it was listed and
    where the checks before Ray found it; other nodes may not have it. Remote stores are read anywhere."""
    import pyarrow.fs as pafs

    if not isinstance(fs, pafs.LocalFileSystem):
        return {}
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


def _read_files(listing: pa.Table, uri: str) -> pa.Table:
    tables = [
        read_file(uri, p, f, s) for f, p, s in zip(*(listing.column(c).to_pylist() for c in ("file", "path", "shown")))
    ]
    return pa.concat_tables(tables)


def _file_counts():
    from ray.data.aggregate import Count

    return Count(alias_name="rows"), Count(on="id", ignore_nulls=True, alias_name="ids")


def _id_counts():
    from ray.data.aggregate import Count, Min

    return Count(alias_name="n"), Min(on="row", alias_name="first_row")


def _repeated(table: pa.Table) -> pa.Table:
    return table.filter(pc.greater(table.column("n"), 1))


def _text_changed(table: pa.Table) -> pa.Table:
    """One row per block: how many ids changed text, and the smallest of them."""
    ids = table.filter(pc.not_equal(table.column("prompt"), table.column("prompt_now"))).column("id")
    return pa.table(
        {"n": [len(ids)], "first": [pc.min(ids).as_py() if len(ids) else None]},
        schema=pa.schema([("n", pa.int64()), ("first", pa.string())]),
    )


_KEEP = {
    "parsed": lambda t: pc.is_null(t.column("check")),
    "bad": lambda t: pc.is_valid(t.column("check")),
}


def _filter(table: pa.Table, keep: str) -> pa.Table:
    return table.filter(_KEEP[keep](table))


def _where(ds, keep: str):
    return ds.map_batches(_filter, fn_kwargs={"keep": keep}, batch_format="pyarrow")


_BAD_KINDS = ("file", "row", "length")
_SUMMARY = pa.schema(
    [
        ("kind", pa.string()),
        ("n", pa.int64()),
        ("file", pa.int32()),
        ("line", pa.int64()),
        ("check", pa.string()),
        ("where", pa.string()),
        ("reason", pa.string()),
        ("id", pa.string()),
    ]
)


def _summarise(table: pa.Table) -> pa.Table:
    """One block -> its counts of good, truncated and bad rows, and its first bad row of each check."""
    check = table.column("check")
    out = [
        {"kind": "good", "n": pc.sum(pc.is_null(check)).as_py() or 0},
        {"kind": "truncated", "n": pc.sum(pc.fill_null(table.column("truncated"), False)).as_py() or 0},
    ]
    for kind in _BAD_KINDS:
        mask = pc.fill_null(pc.equal(check, kind), False)
        n = pc.sum(mask).as_py() or 0
        if n:
            first = table.filter(mask).sort_by([("file", "ascending"), ("line", "ascending")]).slice(0, 1)
            out.append({"kind": kind, "n": n, **{c: first.column(c)[0].as_py() for c in _SUMMARY.names[2:]}})
    return pa.Table.from_pylist(out, schema=_SUMMARY)


def _summary(ds) -> tuple[dict, dict]:
    """Counts per kind of row, and the first bad row (source order) of each check: one pass, a few rows per
    block to the driver."""
    counts, first = dict.fromkeys(("good", "truncated", *_BAD_KINDS), 0), {}
    for part in ds.map_batches(_summarise, batch_format="pyarrow").take_all():
        counts[part["kind"]] += part["n"]
        if part["kind"] in _BAD_KINDS and (
            part["kind"] not in first
            or (part["file"], part["line"]) < (first[part["kind"]]["file"], first[part["kind"]]["line"])
        ):
            first[part["kind"]] = part
    return counts, first


def _stop_at_first(first: dict, checks: tuple) -> None:
    """DataError with the first row (source order) that failed one of these checks."""
    stopping = [first[c] for c in checks if c in first]
    if stopping:
        raise DataError(error_line(min(stopping, key=lambda r: (r["file"], r["line"]))))
