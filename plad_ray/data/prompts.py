"""Prompt sources: JSONL or Parquet with a `prompt` column, an optional `id` and an
optional `reference` (the expected answer, read by evaluation only).

Prompts are read once by the driver with pyarrow, on any pyarrow filesystem (local
paths, file://, s3://, gs://, hdfs://), and checked before any engine starts: a bad row
found after an hour of generation is the expensive kind of error. Rows without an `id`
get `p<row number>`, so ids are stable across re-runs and rounds.

A source that cannot be read at all (missing, empty, no `prompt` column) always stops
the run. A bad row (malformed JSON, not UTF-8, empty prompt, duplicate id, ...) stops
it too, unless `data.bad_rows: quarantine`: then the row is set aside with its reason,
counted, and written to output_dir/quarantine/ (never dropped silently).
"""

import json
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from plad_ray.data.storage import filesystem_and_path, list_files
from plad_ray.errors import DataError

PROMPT_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string())])
_SOURCE_SCHEMA = pa.schema([*PROMPT_SCHEMA, ("reference", pa.string())])


def engine_prompt(prompt: str, chat_template: bool) -> dict:
    """One prompt as every engine (vLLM or an HTTP endpoint) receives it: the text itself, or, with
    the chat template on, one user turn (`messages`) that the engine renders."""
    return {"messages": [{"role": "user", "content": prompt}]} if chat_template else {"prompt": prompt}


def prompt_token_ids(tokenizer, prompts: list[str], chat_template: bool) -> list[list[int]]:
    """The prompts' token ids as the engine saw them (for length limits and training): the tokenizer's
    own encoding, or one user turn of its chat template with the generation prompt."""
    if not chat_template:
        return tokenizer(list(prompts))["input_ids"]
    ids = tokenizer.apply_chat_template([engine_prompt(p, True)["messages"] for p in prompts],
                                        add_generation_prompt=True, tokenize=True)
    return ids["input_ids"] if hasattr(ids, "keys") else ids


@dataclass
class Prompts:
    table: pa.Table  # id, prompt: the rows to generate for
    quarantined: list[dict] = field(default_factory=list)  # {source, row, id, reason, raw}
    references: dict[str, str] = field(default_factory=dict)  # id -> reference answer, where the source has one


class _Rows:
    """Row-level problems: raise at once (bad_rows=error) or collect (quarantine)."""

    def __init__(self, policy: str):
        self.policy = policy
        self.quarantined: list[dict] = []

    def bad(self, where: str, reason: str, **row) -> None:
        if self.policy == "error":
            raise DataError(f"{where}: {reason}; fix or remove it, or set data.bad_rows=quarantine")
        self.quarantined.append({"where": where, "reason": reason, **row})


def read_prompts(uri: str, max_prompts: int | None = None, bad_rows: str = "error") -> Prompts:
    """Read and check a prompt source."""
    fs, path = filesystem_and_path(uri)
    files = list_files(fs, path, uri)
    if not files:
        raise DataError(f"prompt source {uri}: not found; point data.prompts at a .jsonl or .parquet file or folder")
    rows = _Rows(bad_rows)
    tables = [_read_one(fs, f, _display(uri, f, path), rows) for f in files]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if max_prompts is not None:
        table = table.slice(0, max_prompts)
    if table.num_rows == 0 and not rows.quarantined:
        raise DataError(f"prompt source {uri}: has no rows; add prompts (one JSON object per line with a 'prompt' key)")
    table = _check(table, uri, rows)
    if table.num_rows == 0:
        raise DataError(f"prompt source {uri}: every row is bad ({len(rows.quarantined)} quarantined); fix the source")
    references = {i: r for i, r in zip(table.column("id").to_pylist(), table.column("reference").to_pylist())
                  if r is not None}
    return Prompts(table.select(PROMPT_SCHEMA.names), rows.quarantined, references)


def _display(uri: str, file: str, root: str) -> str:
    return uri if file == root else f"{uri.rstrip('/')}/{file[len(root):].lstrip('/')}"


def _read_one(fs, path: str, shown: str, rows: _Rows) -> pa.Table:
    if path.endswith(".parquet"):
        try:
            table = pq.read_table(path, filesystem=fs)
        except pa.ArrowInvalid as e:
            raise DataError(f"prompt file {shown}: not a readable Parquet file ({e})") from None
        return _select(table, shown)
    if path.endswith((".jsonl", ".json")):
        with fs.open_input_stream(path) as f:
            return _select(_parse_jsonl(f.read(), shown, rows), shown)
    raise DataError(f"prompt file {shown}: unsupported format; use .jsonl (one JSON object per line) or .parquet")


def _parse_jsonl(data: bytes, shown: str, rows: _Rows) -> pa.Table:
    ids, prompts, references, has_id = [], [], [], False
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"prompt file {shown} line {number}"
        raw = line[:200].decode("utf-8", errors="replace")
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            rows.bad(where, "not UTF-8 text (re-encode the file as UTF-8)", raw=raw)
            continue
        except json.JSONDecodeError as e:
            rows.bad(where, f"malformed JSON ({e.msg})", raw=raw)
            continue
        if not isinstance(row, dict):
            rows.bad(where, "expected a JSON object like {\"prompt\": \"...\"}", raw=raw)
        elif "prompt" not in row:
            rows.bad(where, "no 'prompt' key; every line needs one", raw=raw)
        elif row["prompt"] is not None and not isinstance(row["prompt"], str):
            rows.bad(where, f"'prompt' must be a string, not {type(row['prompt']).__name__}", raw=raw)
        else:
            has_id = has_id or "id" in row
            ids.append(None if row.get("id") is None else str(row["id"]))
            prompts.append(row["prompt"])
            reference = row.get("reference")
            references.append(None if reference is None else str(reference))
    columns = {"prompt": pa.array(prompts, pa.string()), "reference": pa.array(references, pa.string())}
    if has_id:
        columns["id"] = pa.array(ids, pa.string())
    return pa.table(columns)


def _select(table: pa.Table, shown: str) -> pa.Table:
    if "prompt" not in table.column_names:
        raise DataError(
            f"prompt file {shown}: no 'prompt' column (columns: {', '.join(table.column_names) or 'none'}); "
            "rename the prompt column to 'prompt'"
        )
    kind = table.schema.field("prompt").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"prompt file {shown}: column 'prompt' must hold strings, not {kind}")
    prompts = table.column("prompt").cast(pa.string())
    ids = table.column("id").cast(pa.string()) if "id" in table.column_names else pa.nulls(table.num_rows, pa.string())
    references = (table.column("reference").cast(pa.string()) if "reference" in table.column_names
                  else pa.nulls(table.num_rows, pa.string()))
    return pa.table({"id": ids, "prompt": prompts, "reference": references}, schema=_SOURCE_SCHEMA)


def _check(table: pa.Table, uri: str, rows: _Rows) -> pa.Table:
    ids = table.column("id").to_pylist()
    prompts = table.column("prompt").to_pylist()
    references = table.column("reference").to_pylist()
    if all(i is None for i in ids):
        ids = [f"p{row:07d}" for row in range(len(ids))]
    seen: dict[str, int] = {}
    keep = []
    for row, (pid, prompt) in enumerate(zip(ids, prompts)):
        where = f"prompt source {uri} row {row}"
        if pid is None or pid == "":
            rows.bad(where, "empty id (give every row an id, or none at all)", prompt=prompt)
        elif pid in seen:
            rows.bad(f"prompt source {uri} rows {seen[pid]} and {row}", f"duplicate id {pid!r} (ids must be unique)",
                     id=pid, prompt=prompt)
        elif prompt is None or not prompt.strip():
            rows.bad(f"{where} (id {pid})", "empty prompt", id=pid)
        else:
            seen[pid] = row
            keep.append(row)
    return pa.table({"id": pa.array([ids[r] for r in keep], pa.string()),
                     "prompt": pa.array([prompts[r] for r in keep], pa.string()),
                     "reference": pa.array([references[r] for r in keep], pa.string())}, schema=_SOURCE_SCHEMA)


def check_cached_prompts(cached: pa.Table, prompts: pa.Table, source: str, cache: str) -> None:
    """Cached teacher outputs (`id`, `prompt`) must answer the prompt text the source now gives
    their id. A row inserted into an id-less source shifts every later `p<row>` id, and a cached
    output would then be paired with another prompt; so any id whose text changed stops the run.

    Vectorised (a join on id): no per-row work on the driver.
    """
    if cached.num_rows == 0:
        return
    # use_threads=False: see parquet._check_unique (Ray Data resizes the driver's Arrow CPU pool)
    joined = cached.select(["id", "prompt"]).join(prompts.select(["id", "prompt"]), "id", join_type="inner",
                                                  right_suffix="_now", use_threads=False)
    changed = joined.filter(pc.not_equal(joined.column("prompt"), joined.column("prompt_now")))
    if changed.num_rows:
        first = changed.column("id")[0].as_py()
        raise DataError(
            f"prompt source {source}: {changed.num_rows} prompt id(s) now name another text than their cached "
            f"teacher output in {cache} (first: {first!r}); give the prompts an `id` column that stays with "
            "their text, or use a new output_dir")
