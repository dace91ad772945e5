"""Resuming pair generation on a real local Ray: the (prompt id, sample index) keys an interrupted run
wrote are taken out by a Ray Data anti-join (generate.stages.samples_to_generate), not a Python set."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from plad_ray import pairs

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("num_partitions", [1, 3])
def test_samples_to_generate_is_every_key_not_yet_written(local_ray, tmp_path, num_partitions):
    import ray.data

    from plad_ray.data import parquet
    from plad_ray.generate.stages import samples_to_generate

    teacher = pa.table(
        {
            "id": [f"p{i:03d}" for i in range(40)],
            "prompt": [f"w{i}>" for i in range(40)],
            "teacher_output": [f"{i}w" for i in range(40)],
        }
    )
    # An interrupted run's pending pairs, written as the pairs schema writes them (sample_index int32),
    # in two files: every sample of the first 10 prompts, sample 1 of prompts 10-19.
    done = [(f"p{i:03d}", k) for i in range(10) for k in range(3)] + [(f"p{i:03d}", 1) for i in range(10, 20)]
    uri = str(tmp_path / "pairs")
    (tmp_path / "pairs.partial").mkdir()
    for n, part in enumerate((done[:17], done[17:])):
        table = pa.table({"id": [i for i, _ in part], "sample_index": pa.array([k for _, k in part], pa.int32())})
        pq.write_table(table, tmp_path / "pairs.partial" / f"part-{n}.parquet")
    done_ds = parquet.done_keys_dataset(uri, ["id", "sample_index"])
    assert done_ds.count() == len(done) == 40

    rows = samples_to_generate(ray.data.from_arrow(teacher), 3, done_ds, num_partitions).take_all()
    keys = [(r["id"], r["sample_index"]) for r in rows]
    expected = {(f"p{i:03d}", k) for i in range(40) for k in range(3)} - set(done)
    assert len(keys) == len(set(keys)) == 40 * 3 - 40 and set(keys) == expected
    by_id = {r["id"]: r for r in rows}
    assert by_id["p025"]["prompt"] == "w25>" and by_id["p025"]["teacher_output"] == "25w"  # the row travels whole

    assert parquet.done_keys_dataset(str(tmp_path / "nothing"), ["id", "sample_index"]) is None
    fresh = samples_to_generate(ray.data.from_arrow(teacher), 2).take_all()
    assert sorted((r["id"], r["sample_index"]) for r in fresh) == [
        (f"p{i:03d}", k) for i in range(40) for k in range(2)
    ]
    assert pairs.expand_samples({"id": "x"}, 2) == [{"id": "x", "sample_index": 0}, {"id": "x", "sample_index": 1}]
