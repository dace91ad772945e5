"""Resumable datasets (plad_ray.data.parquet): pending files count once, cut-off files are redone."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from plad_ray.data import parquet


def pending_file(uri, name, ids):
    folder = parquet.pending_uri(str(uri))
    pq.write_table(pa.table({"id": ids, "sample_index": [0] * len(ids)}), f"{folder}/{name}")


def test_pending_rows_are_done_cut_off_files_are_deleted_and_commit_appends(tmp_path):
    uri = tmp_path / "pairs"
    (tmp_path / "pairs.partial").mkdir()
    pending_file(uri, "a.parquet", ["p1", "p2"])
    pending_file(uri, "b.parquet", ["p3"])
    (tmp_path / "pairs.partial" / "c.parquet").write_bytes(b"PAR1 cut off before the footer")
    logged = []
    keys = parquet.done_keys(str(uri), ["id", "sample_index"], logged.append)
    assert sorted(keys.column("id").to_pylist()) == ["p1", "p2", "p3"]
    assert not (tmp_path / "pairs.partial" / "c.parquet").exists() and "c.parquet" in logged[0]
    assert parquet.files(str(uri)) is None  # nothing committed yet: not a complete dataset

    assert parquet.commit(str(uri), {"student_model": "s"}, logged.append) == 3
    assert not (tmp_path / "pairs.partial").exists()
    manifest = json.loads((uri / "_manifest.json").read_text())
    assert sorted(manifest["files"]) == ["a.parquet", "b.parquet"] and manifest["rows"] == 3
    # A later append (new prompts) commits on top of what is there.
    (tmp_path / "pairs.partial").mkdir()
    pending_file(uri, "d.parquet", ["p4"])
    assert parquet.commit(str(uri), {}, logged.append) == 4
    assert sorted(parquet.read_table(str(uri)).column("id").to_pylist()) == ["p1", "p2", "p3", "p4"]
    assert sorted(parquet.done_keys(str(uri), ["id"]).column("id").to_pylist()) == ["p1", "p2", "p3", "p4"]


def test_commit_of_nothing_still_marks_complete(tmp_path):
    assert parquet.commit(str(tmp_path / "teacher"), {"teacher_model": "t"}) == 0
    assert json.loads((tmp_path / "teacher" / "_manifest.json").read_text())["rows"] == 0
