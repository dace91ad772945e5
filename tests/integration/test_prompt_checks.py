"""The prompt stage as Ray Data runs it (plad_ray.data.prompt_checks): ids across files, policies,
one clear line naming the first bad row in source order, the quarantine, and cached teacher outputs
against the prompts they answer."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from plad_ray.data.limits import Limit
from plad_ray.data.prompt_checks import check_cached_prompts, check_prompts, source_files
from plad_ray.errors import DataError
from plad_ray.models import tiny

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    tiny.build_tokenizer().save_pretrained(folder)
    return str(folder)


def jsonl(tmp_path, lines, name="p.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return str(path)


def check(uri, bad_rows="error", too_long="error", limits=(), max_prompts=None):
    return check_prompts(uri, max_prompts, bad_rows, too_long, list(limits))


def prompts_of(checked) -> dict:
    rows = sorted(checked.prompts.take_all(), key=lambda r: r["id"])
    return {"id": [r["id"] for r in rows], "prompt": [r["prompt"] for r in rows]}


def test_ids_are_row_numbers_across_files_in_listing_order(local_ray, tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    jsonl(folder, ['{"prompt": "a"}', "", '{"prompt": "b", "extra": 1}'], "1.jsonl")
    jsonl(folder, ['{"prompt": "c"}'], "2.jsonl")
    checked = check(str(folder))
    assert checked.count == 3 and checked.quarantined == 0 and checked.quarantine is None
    assert prompts_of(checked) == {"id": ["p0000000", "p0000001", "p0000002"], "prompt": ["a", "b", "c"]}


def test_parquet_folder_with_ids_max_prompts_and_a_filesystem_uri(local_ray, tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    pq.write_table(pa.table({"id": [1, 2], "prompt": ["x", "y"], "reference": ["X", None]}), folder / "a.parquet")
    pq.write_table(pa.table({"id": [3], "prompt": ["z"]}), folder / "b.parquet")
    checked = check(str(folder))
    assert sorted(checked.prompts.take_all(), key=lambda r: r["id"]) == [
        {"id": "1", "prompt": "x", "reference": "X"},
        {"id": "2", "prompt": "y", "reference": None},
        {"id": "3", "prompt": "z", "reference": None},
    ]
    assert check("file://" + str(folder), max_prompts=2).count == 2  # a pyarrow filesystem URI


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a"}', '{"prompt": "b"'], "line 2: malformed JSON"),
        (['{"prompt": "a"}', b'{"prompt": "\xff"}'], "line 2: not UTF-8 text"),
        (['{"prompt": "  "}'], "row 0 (id p0000000): empty prompt"),
        (['{"prompt": null}'], "row 0 (id p0000000): empty prompt"),
        (
            ['{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": "y"}', '{"id": "a", "prompt": "z"}'],
            "rows 0 and 2: duplicate id 'a'",
        ),
        ([""], "has no rows"),
    ],
)
def test_the_first_bad_row_stops_the_run_with_one_line(local_ray, tmp_path, lines, message):
    path = jsonl(tmp_path, lines)
    with pytest.raises(DataError) as error:
        check(path)
    assert message in str(error.value) and path in str(error.value) and "\n" not in str(error.value)


def test_first_in_source_order_across_files(local_ray, tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    jsonl(folder, ['{"prompt": "a"}'] * 3 + ['{"prompt": "b"'], "1.jsonl")
    jsonl(folder, ['{"prompt": "c"'], "2.jsonl")
    with pytest.raises(DataError, match=r"1.jsonl line 4: malformed JSON"):
        check(str(folder))


def test_bad_rows_quarantined_with_reasons_and_counted(local_ray, tmp_path):
    path = jsonl(
        tmp_path,
        [
            '{"id": "a", "prompt": "x"}',
            '{"id": "b", "prompt": "y"',
            b'{"prompt": "\xff"}',
            '{"id": "a", "prompt": "z"}',
            '{"id": "c", "prompt": ""}',
            '{"id": "d", "prompt": "w"}',
        ],
    )
    checked = check(path, bad_rows="quarantine")
    assert prompts_of(checked) == {"id": ["a", "d"], "prompt": ["x", "w"]}
    assert checked.quarantined == 4
    rows = {r["where"]: r["reason"] for r in checked.quarantine.take_all()}
    assert rows[f"prompt file {path} line 2"].startswith("malformed JSON")
    assert rows[f"prompt file {path} line 3"].startswith("not UTF-8")
    assert rows[f"prompt source {path} rows 0 and 1"] == "duplicate id 'a' (ids must be unique)"
    assert rows[f"prompt source {path} row 2 (id c)"] == "empty prompt"
    with pytest.raises(DataError, match=r"no prompt is usable \(1 set aside, first: malformed JSON"):
        check(jsonl(tmp_path, ['{"prompt": "b"'], "all-bad.jsonl"), bad_rows="quarantine")


def test_a_file_that_cannot_be_read_stops_the_run_under_quarantine_too(local_ray, tmp_path):
    with pytest.raises(DataError, match="not found"):
        source_files(str(tmp_path / "missing.jsonl"))
    (tmp_path / "p.csv").write_text("prompt\na\n")
    with pytest.raises(DataError, match="unsupported format"):
        source_files(str(tmp_path / "p.csv"))
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"no 'prompt' column \(columns: text\)"):
        check(str(tmp_path / "p.parquet"), bad_rows="quarantine")
    # Parquet states its schema in the footer: the listing before Ray (and --check) refuses these already.
    with pytest.raises(DataError, match=r"p.parquet: no 'prompt' column \(columns: text\)"):
        source_files(str(tmp_path / "p.parquet"))
    (tmp_path / "ints").mkdir()
    pq.write_table(pa.table({"prompt": [1]}), tmp_path / "ints" / "p.parquet")
    with pytest.raises(DataError, match=r"ints/p.parquet: column 'prompt' must hold strings, not int64"):
        source_files(str(tmp_path / "ints"))


def test_length_policies(local_ray, tmp_path, tok):
    path = jsonl(tmp_path, [json.dumps({"prompt": p}) for p in ("abc>", "abcdefgh>", "ab>")])
    limits = [
        Limit("teacher.max_model_len - teacher.sampling.max_tokens", tok, False, 8),
        Limit("train.max_length - 1", tok, False, 6),
    ]
    skipped = check(path, too_long="skip", limits=limits)
    assert prompts_of(skipped)["prompt"] == ["abc>", "ab>"] and skipped.quarantined == 1 and skipped.truncated == 0
    assert skipped.quarantine.take_all()[0]["reason"] == (
        "9 prompt tokens exceed teacher.max_model_len - teacher.sampling.max_tokens = 8"
    )
    cut = check(path, too_long="truncate", limits=limits)
    assert prompts_of(cut)["prompt"] == ["abc>", "defgh>", "ab>"] and cut.truncated == 1 and cut.quarantined == 0
    with pytest.raises(DataError, match=r"row 1 \(id p0000001\): 9 prompt tokens exceed teacher.max_model_len"):
        check(path, too_long="error", limits=limits)


def test_cached_teacher_outputs_must_match_the_prompt_text_of_their_id(local_ray, tmp_path):

    words = [f"w{i}>" for i in range(6)]
    source = tmp_path / "p.jsonl"
    source.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in words))
    cache = check(str(source)).prompts.select_columns(["id", "prompt"])
    # Appended rows: new ids, the old ones unchanged -> fine (the teacher runs for the new ids only).
    source.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in words + ["new1>", "new2>"]))
    check_cached_prompts(cache, check(str(source)).prompts, str(source), "out/teacher")
    # One row inserted at the top of an id-less file: every id p0..p5 now names the previous row's text.
    source.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in ["first>"] + words))
    with pytest.raises(
        DataError,
        match=r"^prompt source .*p.jsonl: 6 prompt id\(s\) now name another text than their "
        r"cached teacher output in out/teacher \(first: 'p0000000'\); give the "
        r"prompts an `id`",
    ):
        check_cached_prompts(cache, check(str(source)).prompts, str(source), "out/teacher")
    # With ids that travel with their text, the same insertion is harmless.
    keyed = tmp_path / "k.jsonl"
    keyed.write_text("".join(json.dumps({"id": w, "prompt": w}) + "\n" for w in words))
    cache = check(str(keyed)).prompts.select_columns(["id", "prompt"])
    keyed.write_text("".join(json.dumps({"id": w, "prompt": w}) + "\n" for w in ["first>"] + words))
    check_cached_prompts(cache, check(str(keyed)).prompts, str(keyed), "out/teacher")
    check_cached_prompts(None, check(str(source)).prompts, str(source), "out/teacher")  # first run: no cache


def test_the_checks_hold_one_materialised_copy_of_the_source(local_ray, tmp_path, monkeypatch, tok):
    """Before: the parsed rows, the numbered rows, the checked rows and the prompts were each materialised (up to
    four copies of a source of 1M prompts in the object store). Now only the checked rows are; the rest streams."""
    import ray.data

    sizes = []
    materialize = ray.data.Dataset.materialize

    def counted(self):
        done = materialize(self)
        sizes.append(done.count())
        return done

    monkeypatch.setattr(ray.data.Dataset, "materialize", counted)
    lines = [json.dumps({"id": f"q{i}", "prompt": "ab" * (i % 5 + 1) + ">"}) for i in range(40)]
    lines.append('{"id": "q1", "prompt": "x>"}')
    checked = check(
        jsonl(tmp_path, lines), bad_rows="quarantine", too_long="skip", limits=[Limit("student engine", tok, False, 8)]
    )
    assert checked.count + checked.quarantined == 41 and checked.quarantined > 1  # a duplicate and too-long rows
    assert [n for n in sizes if n >= 41] == [41]  # one copy of every row; the other, the duplicated ids (1 row)
    assert sorted(sizes) == [1, 41]
