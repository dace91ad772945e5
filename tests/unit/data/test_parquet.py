"""Resumable datasets (plad_ray.data.parquet): pending files count once, cut-off files are redone.
Commit's uniqueness check, row count and token sums run in Ray Data: a local Ray for the module."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from plad_ray.data import parquet

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


def done_keys(uri: str, columns: list[str], log=print) -> pa.Table:
    """Every written row's keys, committed or not, read here (what the anti-joins read in Ray tasks)."""
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in parquet.written_files(uri, log)])


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
    keys = done_keys(str(uri), ["id", "sample_index"], logged.append)
    assert sorted(keys.column("id").to_pylist()) == ["p1", "p2", "p3"]
    assert not (tmp_path / "pairs.partial" / "c.parquet").exists() and "c.parquet" in logged[0]
    assert parquet.files(str(uri)) is None  # nothing committed yet: not a complete dataset

    assert parquet.commit(str(uri), {"student_model": "s"}, KEYS, logged.append) == 3
    assert not (tmp_path / "pairs.partial").exists()
    manifest = json.loads((uri / "_manifest.json").read_text())
    assert sorted(manifest["files"]) == ["a.parquet", "b.parquet"] and manifest["rows"] == 3
    # A later append (new prompts) commits on top of what is there.
    (tmp_path / "pairs.partial").mkdir()
    pending_file(uri, "d.parquet", ["p4"])
    assert parquet.commit(str(uri), {}, KEYS, logged.append) == 4
    assert sorted(parquet.read_table(str(uri)).column("id").to_pylist()) == ["p1", "p2", "p3", "p4"]
    assert sorted(done_keys(str(uri), ["id"]).column("id").to_pylist()) == ["p1", "p2", "p3", "p4"]


def test_commit_of_nothing_still_marks_complete(tmp_path):
    assert parquet.commit(str(tmp_path / "teacher"), {"teacher_model": "t"}, ["id"]) == 0
    assert json.loads((tmp_path / "teacher" / "_manifest.json").read_text())["rows"] == 0


def committed_dataset(tmp_path, ids):
    uri = tmp_path / "pairs"
    (tmp_path / "pairs.partial").mkdir()
    pending_file(uri, "old.parquet", ids)
    parquet.commit(str(uri), {"student_model": "s"}, KEYS)
    return uri


KEYS = ["id", "sample_index"]


class Crash(Exception):
    pass


def test_a_commit_interrupted_between_its_moves_shows_the_old_dataset_and_the_next_commit_rolls_forward(
    tmp_path, monkeypatch
):
    uri = committed_dataset(tmp_path, ["p1", "p2"])
    (tmp_path / "pairs.partial").mkdir()
    pending_file(uri, "a.parquet", ["p3"])
    pending_file(uri, "b.parquet", ["p4", "p5"])
    real_move, moves = parquet._move, []

    def crash_after_one(fs, src, dst):
        if moves:
            raise Crash
        moves.append(src)
        real_move(fs, src, dst)

    monkeypatch.setattr(parquet, "_move", crash_after_one)
    try:
        parquet.commit(str(uri), {}, KEYS)
    except Crash:
        pass
    assert len(moves) == 1 and len(list(uri.glob("*.parquet"))) == 2  # one file moved in, not yet listed
    # Readers see the old complete dataset, not a mix; the moved file's rows still count as written.
    assert sorted(parquet.read_table(str(uri)).column("id").to_pylist()) == ["p1", "p2"]
    assert sorted(done_keys(str(uri), KEYS).column("id").to_pylist()) == ["p1", "p2", "p3", "p4", "p5"]
    monkeypatch.setattr(parquet, "_move", real_move)
    logged = []
    assert parquet.commit(str(uri), {}, KEYS, logged.append) == 5
    assert sorted(parquet.read_table(str(uri)).column("id").to_pylist()) == ["p1", "p2", "p3", "p4", "p5"]
    assert "1 file(s) an interrupted commit had moved in" in logged[0]
    assert not (tmp_path / "pairs.partial").exists()


def test_a_commit_interrupted_before_its_manifest_leaves_the_old_manifest_and_rolls_forward(tmp_path, monkeypatch):
    uri = committed_dataset(tmp_path, ["p1"])
    (tmp_path / "pairs.partial").mkdir()
    pending_file(uri, "a.parquet", ["p2"])
    real_write = parquet.storage.write_json

    def crash(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(parquet.storage, "write_json", crash)
    try:
        parquet.commit(str(uri), {}, KEYS)
    except Crash:
        pass
    assert json.loads((uri / "_manifest.json").read_text())["files"] == ["old.parquet"]
    assert parquet.read_table(str(uri)).column("id").to_pylist() == ["p1"]
    monkeypatch.setattr(parquet.storage, "write_json", real_write)
    assert parquet.commit(str(uri), {}, KEYS) == 2
    assert sorted(json.loads((uri / "_manifest.json").read_text())["files"]) == ["a.parquet", "old.parquet"]


def test_a_key_written_twice_is_refused_with_one_line_and_nothing_is_committed(tmp_path):
    import pytest

    from plad_ray.errors import DataError

    uri = committed_dataset(tmp_path, ["p1", "p2"])
    (tmp_path / "pairs.partial").mkdir()
    pending_file(uri, "again.parquet", ["p3", "p2"])
    with pytest.raises(DataError) as err:
        parquet.commit(str(uri), {}, KEYS)
    message = str(err.value)
    assert "\n" not in message and "1 key(s) written twice" in message and "'p2'" in message
    assert "nothing committed" in message and str(tmp_path / "pairs.partial") in message
    assert json.loads((uri / "_manifest.json").read_text())["files"] == ["old.parquet"]
    assert (tmp_path / "pairs.partial" / "again.parquet").exists()  # left for the user to inspect


def test_pending_sum_counts_only_what_this_run_wrote(tmp_path):
    # A crashed run left p1, p2; this run writes p3 (the 19th issue's "248 outputs, 1703 tokens":
    # the tokens of all 256 were reported as this run's).
    uri = tmp_path / "teacher"
    (tmp_path / "teacher.partial").mkdir()
    pq.write_table(
        pa.table({"id": ["p1", "p2"], "teacher_num_tokens": [5, 7]}), tmp_path / "teacher.partial" / "a.parquet"
    )
    earlier = parquet.uncommitted_files(str(uri))
    pq.write_table(pa.table({"id": ["p3"], "teacher_num_tokens": [4]}), tmp_path / "teacher.partial" / "b.parquet")
    assert parquet.pending_sum(str(uri), "teacher_num_tokens", earlier) == 4
    assert parquet.pending_sum(str(uri), "teacher_num_tokens") == 16


def test_a_commit_of_many_files_reads_their_footers_and_moves_them_in_ray_tasks(tmp_path, monkeypatch):
    # Past FILES_PER_TASK files, footers are read and files moved by Ray tasks (one per FILES_PER_TASK files), not
    # one at a time on the driver; the dataset committed is the same. 2 files a task here, 7 files.
    monkeypatch.setattr(parquet, "FILES_PER_TASK", 2)
    uri = tmp_path / "pairs"
    (tmp_path / "pairs.partial").mkdir()
    for i in range(6):
        pending_file(uri, f"f{i}.parquet", [f"p{i}a", f"p{i}b"])
    (tmp_path / "pairs.partial" / "cut.parquet").write_bytes(b"PAR1 cut off before the footer")
    local_moves = []
    monkeypatch.setattr(parquet, "_move", lambda *args: local_moves.append(args))  # the driver's own: unused
    logged = []
    assert parquet.commit(str(uri), {}, KEYS, logged.append) == 12
    assert local_moves == []  # every move ran in a task (their processes have the module's own _move)
    assert any("cut.parquet" in line for line in logged) and not (tmp_path / "pairs.partial").exists()
    assert sorted(json.loads((uri / "_manifest.json").read_text())["files"]) == [f"f{i}.parquet" for i in range(6)]
    assert sorted(parquet.read_table(str(uri)).column("id").to_pylist()) == sorted(
        f"p{i}{s}" for i in range(6) for s in "ab"
    )


def test_a_dataset_without_a_column_its_reader_needs_is_refused_in_one_line(tmp_path):
    # A teacher cache written by another version (or by hand) without the columns the student step reads: the
    # reader stops before any stage runs, naming the folder, what is missing and what is there.
    from plad_ray.errors import DataError
    from plad_ray.generate.schemas import TEACHER_READ_BY_STUDENT

    uri = tmp_path / "teacher"
    (tmp_path / "teacher.partial").mkdir()
    pending_file(uri, "a.parquet", ["p1", "p2"])  # columns id, sample_index
    parquet.commit(str(uri), {}, ["id"], lambda _: None)
    parquet.require_columns(str(uri), ["id", "sample_index"], "teacher outputs")  # it has those
    with pytest.raises(DataError) as err:
        parquet.require_columns(str(uri), TEACHER_READ_BY_STUDENT, "teacher outputs")
    missing = ", ".join(c for c in TEACHER_READ_BY_STUDENT if c != "id")
    assert str(err.value) == (
        f"teacher outputs {uri}: no {missing} columns (its columns: id, sample_index); delete it to make it again"
    )
    parquet.require_columns(str(tmp_path / "pairs"), ["id"], "pairs")  # not complete yet: nothing to check
