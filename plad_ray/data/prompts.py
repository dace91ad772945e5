"""Prompt sources: JSONL or Parquet with a `prompt` column and an optional `id`.

Prompts are read once by the driver with pyarrow, on any pyarrow filesystem (local
paths, file://, s3://, gs://, hdfs://), and checked before any engine starts: a bad row
found after an hour of generation is the expensive kind of error. Rows without an `id`
get `p<row number>`, so ids are stable across re-runs and rounds.
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from plad_ray.data.storage import filesystem_and_path, list_files
from plad_ray.errors import DataError

PROMPT_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string())])


def read_prompts(uri: str, max_prompts: int | None = None) -> pa.Table:
    """Read and check a prompt source; returns a table with string columns id, prompt."""
    fs, path = filesystem_and_path(uri)
    files = list_files(fs, path, uri)
    if not files:
        raise DataError(f"prompt source {uri}: not found; point data.prompts at a .jsonl or .parquet file or folder")
    tables = [_read_one(fs, f, _display(uri, f, path)) for f in files]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if max_prompts is not None:
        table = table.slice(0, max_prompts)
    if table.num_rows == 0:
        raise DataError(f"prompt source {uri}: has no rows; add prompts (one JSON object per line with a 'prompt' key)")
    return _check(table, uri)


def _display(uri: str, file: str, root: str) -> str:
    return uri if file == root else f"{uri.rstrip('/')}/{file[len(root):].lstrip('/')}"


def _read_one(fs, path: str, shown: str) -> pa.Table:
    if path.endswith(".parquet"):
        try:
            table = pq.read_table(path, filesystem=fs)
        except pa.ArrowInvalid as e:
            raise DataError(f"prompt file {shown}: not a readable Parquet file ({e})") from None
        return _select(table, shown)
    if path.endswith((".jsonl", ".json")):
        with fs.open_input_stream(path) as f:
            return _select(_parse_jsonl(f.read(), shown), shown)
    raise DataError(f"prompt file {shown}: unsupported format; use .jsonl (one JSON object per line) or .parquet")


def _parse_jsonl(data: bytes, shown: str) -> pa.Table:
    ids, prompts, has_id = [], [], False
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"prompt file {shown} line {number}: not UTF-8 text; re-encode the file as UTF-8") from None
        except json.JSONDecodeError as e:
            raise DataError(f"prompt file {shown} line {number}: malformed JSON ({e.msg}); fix or remove the line") from None
        if not isinstance(row, dict):
            raise DataError(f"prompt file {shown} line {number}: expected a JSON object like {{\"prompt\": \"...\"}}")
        if "prompt" not in row:
            raise DataError(f"prompt file {shown} line {number}: no 'prompt' key; every line needs one")
        has_id = has_id or "id" in row
        ids.append(None if row.get("id") is None else str(row["id"]))
        prompts.append(row["prompt"])
    columns = {"prompt": pa.array(prompts, type=_string_or_raise(prompts, shown))}
    if has_id:
        columns["id"] = pa.array(ids, pa.string())
    return pa.table(columns)


def _string_or_raise(values: list, shown: str) -> pa.DataType:
    for index, value in enumerate(values):
        if value is not None and not isinstance(value, str):
            raise DataError(f"prompt file {shown} row {index}: 'prompt' must be a string, got {type(value).__name__}")
    return pa.string()


def _select(table: pa.Table, shown: str) -> pa.Table:
    if "prompt" not in table.column_names:
        raise DataError(
            f"prompt file {shown}: no 'prompt' column (columns: {', '.join(table.column_names) or 'none'}); "
            "rename the prompt column to 'prompt'"
        )
    if not pa.types.is_string(table.schema.field("prompt").type) and not pa.types.is_large_string(
        table.schema.field("prompt").type
    ):
        raise DataError(f"prompt file {shown}: column 'prompt' must hold strings, not {table.schema.field('prompt').type}")
    prompts = table.column("prompt").cast(pa.string())
    if "id" in table.column_names:
        ids = table.column("id").cast(pa.string())
    else:
        ids = pa.nulls(table.num_rows, pa.string())
    return pa.table({"id": ids, "prompt": prompts}, schema=PROMPT_SCHEMA)


def _check(table: pa.Table, uri: str) -> pa.Table:
    ids = table.column("id").to_pylist()
    prompts = table.column("prompt").to_pylist()
    if all(i is None for i in ids):
        ids = [f"p{row:07d}" for row in range(len(ids))]
    seen: dict[str, int] = {}
    for row, (pid, prompt) in enumerate(zip(ids, prompts)):
        if pid is None or pid == "":
            raise DataError(f"prompt source {uri} row {row}: empty id; give every row an id or none at all")
        if pid in seen:
            raise DataError(f"prompt source {uri} rows {seen[pid]} and {row}: duplicate id {pid!r}; ids must be unique")
        seen[pid] = row
        if prompt is None or not prompt.strip():
            raise DataError(f"prompt source {uri} row {row} (id {pid}): empty prompt; remove the row or fill it in")
    return pa.table({"id": pa.array(ids, pa.string()), "prompt": table.column("prompt")}, schema=PROMPT_SCHEMA)
