"""Prompt sources, file by file and block by block (plad_ray.data.prompts): formats, ids, and one
clear line per bad row. The same functions run as Ray Data operations in test_prompt_checks.py."""

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import ROOT

from plad_ray.data.prompts import error_line, mark_duplicates, number_rows, read_file


def jsonl(tmp_path, lines, name="p.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return str(path)


def rows_of(path: str, file: int = 0) -> pa.Table:
    return read_file(path, path, file, path)


def test_jsonl_lines_become_parsed_rows_or_bad_rows_with_their_line(tmp_path):
    path = jsonl(
        tmp_path,
        [
            '{"prompt": "a", "reference": 7}',
            "",
            '{"prompt": "b"',
            b'{"prompt": "\xff"}',
            '["a"]',
            '{"text": "a"}',
            '{"prompt": 3}',
            '{"id": 5, "prompt": "c", "extra": 1}',
        ],
    )
    rows = rows_of(path, file=3).to_pylist()
    assert [(r["line"], r["index"], r["id"], r["prompt"], r["reference"]) for r in rows if r["check"] is None] == [
        (1, 0, None, "a", "7"),
        (8, 1, "5", "c", None),
    ]
    bad = [(r["line"], r["check"], r["where"], r["reason"]) for r in rows if r["check"] is not None]
    assert [b[0] for b in bad] == [3, 4, 5, 6, 7] and {b[1] for b in bad} == {"row"}
    assert bad[0][2] == f"prompt file {path} line 3" and bad[0][3].startswith("malformed JSON")
    assert [b[3] for b in bad[1:]] == [
        "not UTF-8 text (re-encode the file as UTF-8)",
        'expected a JSON object like {"prompt": "..."}',
        "no 'prompt' key; every line needs one",
        "'prompt' must be a string, not int",
    ]
    assert {r["file"] for r in rows} == {3} and rows[1]["raw"] == '{"prompt": "b"'


def test_parquet_rows_and_unreadable_files(tmp_path):
    pq.write_table(pa.table({"id": [1, 2], "prompt": ["x", "y"], "other": [0, 0]}), tmp_path / "a.parquet")
    rows = rows_of(str(tmp_path / "a.parquet")).to_pylist()
    assert [(r["line"], r["index"], r["id"], r["prompt"], r["check"]) for r in rows] == [
        (0, 0, "1", "x", None),
        (1, 1, "2", "y", None),
    ]
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "b.parquet")
    (tmp_path / "c.parquet").write_bytes(b"not parquet")
    pq.write_table(pa.table({"prompt": [1]}), tmp_path / "d.parquet")
    problems = [rows_of(str(tmp_path / f"{n}.parquet")).to_pylist() for n in "bcd"]
    assert all(len(p) == 1 and p[0]["check"] == "file" for p in problems)
    assert error_line(problems[0][0]) == (
        f"prompt file {tmp_path}/b.parquet: no 'prompt' column (columns: text); rename the prompt column to 'prompt'"
    )
    assert "not a readable Parquet file" in problems[1][0]["reason"]
    assert problems[2][0]["reason"] == "column 'prompt' must hold strings, not int64"


def test_rows_are_numbered_across_files_named_when_the_source_has_no_ids_and_cut_at_max_prompts(tmp_path):
    first = rows_of(jsonl(tmp_path, ['{"prompt": "a"}', '{"prompt": "b"', '{"prompt": "  "}'], "a.jsonl"), 0)
    second = rows_of(jsonl(tmp_path, ['{"prompt": "c"}', '{"prompt": "d"}'], "b.jsonl"), 1)
    offsets = {0: 2, 1: 0}  # file 1 first in this listing, as the driver's per-file counts say
    out = [number_rows(t, offsets, True, 3, "src").to_pylist() for t in (first, second)]
    rows = {(r["file"], r["line"]): r for part in out for r in part}
    assert (rows[(1, 1)]["row"], rows[(1, 1)]["id"]) == (0, "p0000000")
    assert (rows[(0, 1)]["row"], rows[(0, 1)]["id"], rows[(0, 1)]["check"]) == (2, "p0000002", None)
    assert (rows[(0, 2)]["row"], rows[(0, 2)]["check"]) == (None, "row")  # unparsable: kept as it was
    assert (0, 3) not in rows  # row 3 is past max_prompts = 3
    blank = number_rows(first, {0: 0}, True, None, "src").to_pylist()[2]
    assert (
        error_line(blank) == "prompt source src row 1 (id p0000001): empty prompt; fix or remove it, or set "
        "data.bad_rows=quarantine"
    )
    ids = rows_of(jsonl(tmp_path, ['{"id": "x", "prompt": "a"}', '{"prompt": "b"}'], "c.jsonl"))
    missing = number_rows(ids, {0: 0}, False, None, "src").to_pylist()
    assert [r["id"] for r in missing] == ["x", None] and missing[1]["reason"].startswith("empty id")


def test_every_row_of_a_repeated_id_after_its_first_is_bad(tmp_path):
    rows = number_rows(
        rows_of(
            jsonl(tmp_path, ['{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": "y"}', '{"id": "a", "prompt": "z"}'])
        ),
        {0: 0},
        False,
        None,
        "src",
    )
    joined = rows.append_column("first_row", pa.array([0, None, 0], pa.int64()))
    out = mark_duplicates(joined, "src").to_pylist()
    assert [r["check"] for r in out] == [None, None, "row"] and "first_row" not in out[0]
    assert error_line(out[2]) == (
        "prompt source src rows 0 and 2: duplicate id 'a' (ids must be unique); fix or "
        "remove it, or set data.bad_rows=quarantine"
    )


def test_shipped_tiny_prompts():
    rows = rows_of(str(ROOT / "configs/prompts/tiny-reverse.jsonl")).to_pylist()
    assert len(rows) == 1024 and all(r["check"] is None for r in rows)  # jobs.tiny_models --num-prompts 1024
    assert all(r["prompt"].endswith(">") for r in rows) and rows[0]["id"] == "rev-00000"
