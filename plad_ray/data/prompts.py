"""Prompt sources: JSONL or Parquet with a `prompt` column, an optional `id` and an
optional `reference` (the expected answer, read by evaluation only).

The functions here are pure: they turn one file, or one block of rows, into rows of
ROW_SCHEMA, where a good row has no `check` and a bad row names the check it failed, where
it sits and why. plad_ray.data.prompt_checks runs them as Ray Data operations over blocks,
so no prompt passes through the driver. Rows without an `id` get `p<row number>` (their
position among the source's parsed rows, in file order), so ids are stable across re-runs.

A source that cannot be read at all (missing, no `prompt` column, unreadable file) always
stops the run. A bad row (malformed JSON, not UTF-8, empty prompt, duplicate id, ...) stops
it too, unless `data.bad_rows: quarantine`: then the row is set aside with its reason,
counted, and written to output_dir/quarantine/prompts/ (never dropped silently).
"""

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from plad_ray.data.storage import filesystem_and_path

FORMATS = (".jsonl", ".json", ".parquet")
ROW_SCHEMA = pa.schema(
    [
        ("file", pa.int32()),  # the file's place in the source's sorted listing
        ("line", pa.int64()),  # JSONL line (1-based) or Parquet record (0-based): source order within the file
        ("index", pa.int64()),  # a parsed row's position among its file's parsed rows
        ("row", pa.int64()),  # a parsed row's position in the whole source (set by number_rows)
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("reference", pa.string()),
        ("check", pa.string()),  # None: a good row; else "file", "row" or "length" (which policy decides)
        ("where", pa.string()),
        ("reason", pa.string()),
        ("raw", pa.string()),  # the start of a line that did not parse
        ("truncated", pa.bool_()),  # cut to fit under data.too_long=truncate
    ]
)
QUARANTINE_COLUMNS = ["where", "reason", "id", "prompt", "raw"]
_FIXES = {
    "row": "fix or remove it, or set data.bad_rows=quarantine",
    "length": "shorten it, raise the limit, or set data.too_long to skip or truncate",
}


def engine_prompt(prompt: str, chat_template: bool) -> dict:
    """One prompt as every engine (vLLM or an HTTP endpoint) receives it: the text itself, or, with
    the chat template on, one user turn (`messages`) that the engine renders."""
    return {"messages": [{"role": "user", "content": prompt}]} if chat_template else {"prompt": prompt}


def prompt_token_ids(tokenizer, prompts: list[str], chat_template: bool) -> list[list[int]]:
    """The prompts' token ids as the engine saw them (for length limits and training): the tokenizer's
    own encoding, or one user turn of its chat template with the generation prompt."""
    if not chat_template:
        return tokenizer(list(prompts))["input_ids"]
    ids = tokenizer.apply_chat_template(
        [engine_prompt(p, True)["messages"] for p in prompts], add_generation_prompt=True, tokenize=True
    )
    return ids["input_ids"] if hasattr(ids, "keys") else ids


def error_line(row: dict) -> str:
    """The one line a bad row stops the run with (file problems carry their fix in the reason)."""
    where = row["where"] + (f" (id {row['id']})" if row["check"] == "length" else "")
    fix = _FIXES.get(row["check"])
    return f"{where}: {row['reason']}" + (f"; {fix}" if fix else "")


def display(uri: str, file: str, root: str) -> str:
    """A file of the source as the user named it."""
    return uri if file == root else f"{uri.rstrip('/')}/{file[len(root) :].lstrip('/')}"


def rows_table(columns: dict, n: int) -> pa.Table:
    """A ROW_SCHEMA table of n rows from the given columns (the others null)."""
    return pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in ROW_SCHEMA}, schema=ROW_SCHEMA)


def _file_problem(file: int, shown: str, reason: str) -> pa.Table:
    return rows_table(
        {
            "file": pa.array([file], pa.int32()),
            "line": pa.array([0], pa.int64()),
            "check": pa.array(["file"]),
            "where": pa.array([f"prompt file {shown}"]),
            "reason": pa.array([reason]),
        },
        1,
    )


def read_file(uri: str, path: str, file: int, shown: str) -> pa.Table:
    """One file of the source -> ROW_SCHEMA rows: its parsed rows and its unparsable lines; a file
    that cannot be read at all is one row with check "file"."""
    fs, _ = filesystem_and_path(uri)
    if path.endswith(".parquet"):
        try:
            table = pq.read_table(path, filesystem=fs)
        except (pa.ArrowInvalid, OSError) as e:
            return _file_problem(file, shown, f"not a readable Parquet file ({e})")
        return _parquet_rows(table, file, shown)
    with fs.open_input_stream(path) as f:
        return _jsonl_rows(f.read(), file, shown)


def parquet_schema_problem(schema: pa.Schema) -> str | None:
    """Why a Parquet prompt file cannot be read, from its schema alone (checked again by --check from the footer)."""
    if "prompt" not in schema.names:
        return (
            f"no 'prompt' column (columns: {', '.join(schema.names) or 'none'}); rename the prompt column to 'prompt'"
        )
    kind = schema.field("prompt").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        return f"column 'prompt' must hold strings, not {kind}"
    return None


def _parquet_rows(table: pa.Table, file: int, shown: str) -> pa.Table:
    problem = parquet_schema_problem(table.schema)
    if problem:
        return _file_problem(file, shown, problem)
    n = table.num_rows
    columns = {
        "file": pa.array([file] * n, pa.int32()),
        "line": pa.array(range(n), pa.int64()),
        "index": pa.array(range(n), pa.int64()),
        "prompt": table.column("prompt").cast(pa.string()),
    }
    for name in ("id", "reference"):
        if name in table.column_names:
            columns[name] = table.column(name).cast(pa.string())
    return rows_table(columns, n)


def _jsonl_rows(data: bytes, file: int, shown: str) -> pa.Table:
    rows = []  # one file's rows, in the task that parses it
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"prompt file {shown} line {number}"
        raw = line[:200].decode("utf-8", errors="replace")
        bad = {"line": number, "check": "row", "where": where, "raw": raw}
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            rows.append({**bad, "reason": "not UTF-8 text (re-encode the file as UTF-8)"})
            continue
        except json.JSONDecodeError as e:
            rows.append({**bad, "reason": f"malformed JSON ({e.msg})"})
            continue
        if not isinstance(row, dict):
            rows.append({**bad, "reason": 'expected a JSON object like {"prompt": "..."}'})
        elif "prompt" not in row:
            rows.append({**bad, "reason": "no 'prompt' key; every line needs one"})
        elif row["prompt"] is not None and not isinstance(row["prompt"], str):
            rows.append({**bad, "reason": f"'prompt' must be a string, not {type(row['prompt']).__name__}"})
        else:
            rows.append(
                {
                    "line": number,
                    "id": None if row.get("id") is None else str(row["id"]),
                    "prompt": row["prompt"],
                    "reference": None if row.get("reference") is None else str(row["reference"]),
                }
            )
    good = [r for r in rows if "check" not in r]
    for index, r in enumerate(good):
        r["index"] = index
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA) if rows else ROW_SCHEMA.empty_table()
    return table.set_column(0, "file", pa.array([file] * table.num_rows, pa.int32()))


def number_rows(
    block: pa.Table, offsets: dict[int, int], name_ids: bool, max_prompts: int | None, source: str
) -> pa.Table:
    """Parsed rows get their place in the whole source (`row`: the file's offset + index) and, when the
    source has no ids at all, the id `p<row>`; rows past data.max_prompts are dropped; an empty id or
    prompt makes a bad row. Bad rows pass unchanged."""
    block = conform(block)
    parsed = pc.is_null(block.column("check"))
    start = pa.array([offsets.get(f, 0) for f in block.column("file").to_pylist()], pa.int64())
    row = pc.if_else(parsed, pc.add(start, pc.fill_null(block.column("index"), 0)), pa.scalar(None, pa.int64()))
    block = block.set_column(block.schema.get_field_index("row"), "row", row)
    if max_prompts is not None:
        block = block.filter(pc.or_(pc.invert(parsed), pc.less(pc.fill_null(row, 0), max_prompts)))
        parsed, row = pc.is_null(block.column("check")), block.column("row")
    ids = block.column("id")
    if name_ids:
        named = pc.binary_join_element_wise("p", pc.utf8_lpad(pc.cast(row, pa.string()), 7, "0"), "")
        ids = pc.if_else(parsed, named, ids)
        block = block.set_column(block.schema.get_field_index("id"), "id", ids)
    no_id = pc.and_(parsed, pc.fill_null(pc.equal(pc.utf8_length(pc.fill_null(ids, "")), 0), True))
    blank = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(block.column("prompt"))), 0), True)
    no_prompt = pc.and_(pc.and_(parsed, pc.invert(no_id)), blank)
    at = pc.binary_join_element_wise(f"prompt source {source} row ", pc.cast(row, pa.string()), "")
    where = pc.if_else(no_prompt, pc.binary_join_element_wise(at, " (id ", ids, ")", ""), at)
    reason = pc.if_else(
        no_id,
        "empty id (give every row an id, or none at all)",
        pc.if_else(no_prompt, "empty prompt", pa.scalar(None, pa.string())),
    )
    flagged = pc.or_(no_id, no_prompt)
    return _set(
        block,
        check=pc.if_else(flagged, "row", block.column("check")),
        where=pc.if_else(flagged, where, block.column("where")),
        reason=pc.if_else(flagged, reason, block.column("reason")),
    )


def mark_duplicates(block: pa.Table, source: str) -> pa.Table:
    """Rows joined with `first_row` (the smallest row of their id, where the id is on several rows):
    every row but the first is bad."""
    first = block.column("first_row").cast(pa.int64())
    block = conform(block)  # a join hands back large strings
    row = block.column("row")
    later = pc.fill_null(pc.not_equal(first, row), False)
    rows = pc.binary_join_element_wise(
        f"prompt source {source} rows ", pc.cast(first, pa.string()), " and ", pc.cast(row, pa.string()), ""
    )
    reason = pc.binary_join_element_wise("duplicate id '", block.column("id"), "' (ids must be unique)", "")
    return _set(
        block,
        check=pc.if_else(later, "row", block.column("check")),
        where=pc.if_else(later, rows, block.column("where")),
        reason=pc.if_else(later, reason, block.column("reason")),
    )


def conform(block: pa.Table) -> pa.Table:
    """A block in ROW_SCHEMA's columns and types (Ray Data's joins and unions may widen strings)."""
    return block.select(ROW_SCHEMA.names).cast(ROW_SCHEMA)


def _set(block: pa.Table, **columns) -> pa.Table:
    for name, values in columns.items():
        block = block.set_column(block.schema.get_field_index(name), name, pc.cast(values, ROW_SCHEMA.field(name).type))
    return block
