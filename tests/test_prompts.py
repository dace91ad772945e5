"""Prompt sources (plad_ray.data.prompts): formats, ids, and one clear line per bad input."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from plad_ray.data.prompts import check_cached_prompts, read_prompts
from plad_ray.errors import DataError


def jsonl(tmp_path, lines, name="p.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return str(path)


def test_jsonl_without_ids_gets_row_numbers(tmp_path):
    table = read_prompts(jsonl(tmp_path, ['{"prompt": "a"}', "", '{"prompt": "b", "extra": 1}'])).table
    assert table.to_pydict() == {"id": ["p0000000", "p0000001"], "prompt": ["a", "b"]}


def test_parquet_folder_with_ids_and_max_prompts(tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    pq.write_table(pa.table({"id": [1, 2], "prompt": ["x", "y"], "other": [0, 0]}), folder / "a.parquet")
    pq.write_table(pa.table({"id": [3], "prompt": ["z"], "other": [0]}), folder / "b.parquet")
    assert read_prompts(str(folder)).table.to_pydict() == {"id": ["1", "2", "3"], "prompt": ["x", "y", "z"]}
    assert read_prompts(str(folder), max_prompts=2).table.num_rows == 2
    assert read_prompts("file://" + str(folder)).table.num_rows == 3  # pyarrow filesystem URI


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a"}', '{"prompt": "b"'], "line 2: malformed JSON"),
        (['{"prompt": "a"}', b'{"prompt": "\xff"}'], "line 2: not UTF-8 text"),
        (['{"text": "a"}'], "line 1: no 'prompt' key"),
        (['["a"]'], "line 1: expected a JSON object"),
        (['{"prompt": 3}'], "line 1: 'prompt' must be a string, not int"),
        (['{"prompt": "  "}'], "row 0 (id p0000000): empty prompt"),
        (['{"prompt": null}'], "row 0 (id p0000000): empty prompt"),
        (['{"id": "a", "prompt": "x"}', '{"id": "a", "prompt": "y"}'], "rows 0 and 1: duplicate id 'a'"),
        ([""], "has no rows"),
    ],
)
def test_bad_jsonl(tmp_path, lines, message):
    path = jsonl(tmp_path, lines)
    with pytest.raises(DataError) as error:
        read_prompts(path)
    assert message in str(error.value) and path in str(error.value)


def test_bad_rows_quarantined_with_reasons_and_counted(tmp_path):
    path = jsonl(tmp_path, ['{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": "y"', b'{"prompt": "\xff"}',
                            '{"id": "a", "prompt": "z"}', '{"id": "c", "prompt": ""}', '{"id": "d", "prompt": "w"}'])
    prompts = read_prompts(path, bad_rows="quarantine")
    assert prompts.table.to_pydict() == {"id": ["a", "d"], "prompt": ["x", "w"]}
    reasons = [q["reason"] for q in prompts.quarantined]
    assert len(reasons) == 4
    assert reasons[0].startswith("malformed JSON") and reasons[1].startswith("not UTF-8")
    assert reasons[2] == "duplicate id 'a' (ids must be unique)" and reasons[3] == "empty prompt"
    assert prompts.quarantined[0]["where"] == f"prompt file {path} line 2"


def test_missing_wrong_format_and_no_prompt_column(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_prompts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "p.csv").write_text("prompt\na\n")
    with pytest.raises(DataError, match="unsupported format"):
        read_prompts(str(tmp_path / "p.csv"))
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"no 'prompt' column \(columns: text\)"):
        read_prompts(str(tmp_path / "p.parquet"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_prompts(str(tmp_path / "broken.parquet"))


def test_shipped_tiny_prompts():
    table = read_prompts(str(ROOT / "configs/prompts/tiny-reverse.jsonl")).table
    assert table.num_rows == 1024  # python -m jobs.tiny_models --prompts ... --num-prompts 1024
    assert all(p.endswith(">") for p in table.column("prompt").to_pylist())
    assert json.loads(open(ROOT / "configs/prompts/tiny-reverse.jsonl").readline())["id"] == "rev-00000"


def _cache_of(table: pa.Table) -> pa.Table:
    """What the teacher cache keeps of each prompt it answered."""
    return table.select(["id", "prompt"])


def test_cached_teacher_outputs_must_match_the_prompt_text_of_their_id(tmp_path):
    words = [f"w{i}>" for i in range(6)]
    source = tmp_path / "p.jsonl"
    source.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in words))
    cache = _cache_of(read_prompts(str(source)).table)
    # Appended rows: new ids, the old ones unchanged -> fine (the teacher runs for the new ids only).
    source.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in words + ["new1>", "new2>"]))
    check_cached_prompts(cache, read_prompts(str(source)).table, str(source), "out/teacher")
    # One row inserted at the top of an id-less file: every id p0..p5 now names the previous row's text.
    source.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in ["first>"] + words))
    with pytest.raises(DataError, match=r"^prompt source .*p.jsonl: 6 prompt id\(s\) now name another text than their "
                                        r"cached teacher output in out/teacher \(first: 'p\d+'\); give the prompts an `id`"):
        check_cached_prompts(cache, read_prompts(str(source)).table, str(source), "out/teacher")
    # With ids that travel with their text, the same insertion is harmless.
    keyed = tmp_path / "k.jsonl"
    keyed.write_text("".join(json.dumps({"id": w, "prompt": w}) + "\n" for w in words))
    cache = _cache_of(read_prompts(str(keyed)).table)
    keyed.write_text("".join(json.dumps({"id": w, "prompt": w}) + "\n" for w in ["first>"] + words))
    check_cached_prompts(cache, read_prompts(str(keyed)).table, str(keyed), "out/teacher")
    # An empty cache (first run) never refuses.
    check_cached_prompts(cache.slice(0, 0), read_prompts(str(source)).table, str(source), "out/teacher")
