"""train.stream's pieces that need no cluster: a rank's reading of its split (held-out first, then training
rows cut into steps), the counts, the refusals, the resource plan and the write-as-it-passes stage.
The stream itself, with vLLM, Ray Train and DeepSpeed, is tests/integration/test_fault_tolerance.py's streaming test."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.configs import MINIMAL, write

from plad_ray.cluster import check_resources
from plad_ray.config import Config, StudentEngineConfig, TeacherEngineConfig, TrainConfig, load_config
from plad_ray.data import parquet
from plad_ray.errors import ConfigError
from plad_ray.train.stream_feed import StreamFeed, count_rows


def rows(ids, heldout, status=None):
    n = len(ids)
    return {
        "id": np.asarray([f"p{i}" for i in ids]),
        "sample_index": np.zeros(n, dtype=np.int32),
        "heldout": np.asarray(heldout, dtype=bool),
        "status": np.asarray(status or ["ok"] * n),
        "verdict": np.asarray([""] * n),
        "prompt_ids": np.asarray([np.asarray([1, 2], dtype=np.int32)] * n + [None], dtype=object)[:n],
        "chosen_ids": np.asarray([np.asarray([3, 4, 5], dtype=np.int32)] * n + [None], dtype=object)[:n],
        "rejected_ids": np.asarray([np.asarray([6], dtype=np.int32)] * n + [None], dtype=object)[:n],
    }


class Split:
    """A rank's split as a list of numpy batches (what Ray Train's DataIterator.iter_batches yields)."""

    def __init__(self, batches):
        self.batches = batches

    def iter_batches(self, batch_size, batch_format):
        assert batch_format == "numpy"
        return iter(self.batches)


def test_a_rank_reads_its_heldout_pairs_then_its_training_pairs_in_steps():
    split = Split(
        [
            rows([0, 1, 2], [True] * 3),
            rows([3, 4, 5, 6], [True, False, False, False], ["ok", "ok", "too_long", "identical"]),
            rows(range(7, 17), [False] * 10),
        ]
    )
    feed = StreamFeed(split, trained=("ok",), micro_batch_size=2, pad_id=0)
    heldout = feed.heldout()
    assert [b["input_ids"].shape[0] // 2 for b in heldout] == [2, 2]  # p0..p3, collated two pairs a batch
    batches = list(feed.iter_batches(batch_size=4))
    ids = [list(b["id"]) for b in batches]
    # p5 (too long) and p6 (identical, no NLL part) are not trained; the rest in the stream's order
    assert ids == [["p4", "p7", "p8", "p9"], ["p10", "p11", "p12", "p13"], ["p14", "p15", "p16"]]
    counts = feed.finish(trained_rows=8)
    assert counts == {
        "pairs": 17,
        "train": 11,
        "heldout": 4,
        "heldout_ranked": 4,
        "dropped_identical": 1,
        "dropped_too_long": 1,
        "dropped_student_better": 0,
        "trained": 8,
        "untrained": 3,
    }


def test_a_heldout_pair_after_a_training_pair_stops_the_rank():
    feed = StreamFeed(
        Split([rows([0], [True]), rows([1, 2], [False, False]), rows([3], [True])]), trained=("ok",), micro_batch_size=2
    )
    feed.heldout()
    with pytest.raises(RuntimeError, match="a held-out pair came after a training pair"):
        list(feed.iter_batches(batch_size=2))
    with pytest.raises(RuntimeError, match="a held-out pair came after a training pair"):
        StreamFeed(Split([rows([0, 1, 2], [False, True, False])]), trained=("ok",), micro_batch_size=2).heldout()


def test_identical_pairs_train_and_count_with_an_nll_part():
    counts = count_rows(rows([0, 1], [False, False], ["ok", "identical"]), trained=("ok", "identical"), scorer=False)
    assert counts["train"] == 2 and counts["dropped_identical"] == 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.loss.type=listwise", "listwise groups need every sample of a prompt in one row"),
        ("train.max_failures=1", "a restarted worker group would read the stream again"),
        ("train.guard.action=stop", "a streamed epoch takes none"),
        ("train.pairs=given", "there is nothing to generate"),
    ],
)
def test_what_a_stream_cannot_do_is_refused_with_its_key(tmp_path, override, message):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, MINIMAL), ["train.stream=true", override])
    assert str(error.value).startswith("config key train.stream: ") and message in str(error.value)
    # the same without the stream is fine (given pairs are checked when the run starts)
    load_config(write(tmp_path, MINIMAL), ["student.num_samples=2", "train.stream=false", override])


def test_engines_and_trainer_must_fit_at_once():
    cfg = Config(
        output_dir="o",
        teacher=TeacherEngineConfig(model="t"),
        student=StudentEngineConfig(model="s"),
        train=TrainConfig(num_workers=2, stream=True),
    )
    # 1 engine + 2 workers + 1 for Ray Data's tasks + 2 x 0.5 for the tokenizers = 5
    with pytest.raises(ConfigError, match=r"config key train.stream: .* need 5 CPUs \(the cluster has 4 CPUs"):
        check_resources(cfg, {"CPU": 4.0})
    check_resources(cfg, {"CPU": 5.0})
    cfg.train.stream = False
    check_resources(cfg, {"CPU": 4.0})  # one after the other: each fits on its own
    gpu = Config(
        output_dir="o",
        teacher=TeacherEngineConfig(model="t"),
        student=StudentEngineConfig(model="s", replicas=4),
        train=TrainConfig(num_workers=8, stream=True),
    )
    gpu.cluster.use_gpu = True
    with pytest.raises(
        ConfigError, match=r"the student engines \(4 GPUs\) and 8 trainer workers run at once and need 12"
    ):
        check_resources(gpu, {"CPU": 128.0, "GPU": 8.0})
    check_resources(gpu, {"CPU": 128.0, "GPU": 16.0})


def test_the_stream_writes_each_block_once_under_a_name_of_its_own(tmp_path):
    uri = str(tmp_path / "pairs")
    table = pa.table({"id": ["a", "b"], "sample_index": [0, 1]})
    write_block = parquet.WritePending(
        uri, pa.schema([("id", pa.string()), ("sample_index", pa.int32())]), ["id", "sample_index"]
    )
    assert write_block(table).num_rows == 2
    write_block(table)  # Ray Data computing the block again overwrites its file
    write_block(pa.table({"id": ["c"], "sample_index": [0]}))
    files = sorted((tmp_path / "pairs.partial").glob("*.parquet"))
    assert len(files) == 2 and not list((tmp_path / "pairs.partial").glob(".*"))
    assert sorted(r for f in files for r in pq.read_table(f).column("id").to_pylist()) == ["a", "b", "c"]
    assert sorted(parquet.written_files(uri)) == [str(f) for f in files]  # what a resume and a commit see


def test_a_rerun_of_a_stopped_stream_completes_the_pairs_on_disk_instead(tmp_path):
    """A streamed epoch takes no checkpoints: once pairs/ holds any pair (a run stopped mid-stream), the round
    is not streamed again; the pipeline generates the missing pairs and trains from disk (generate_pairs)."""
    from plad_ray.checks import Inputs
    from plad_ray.generate.student import pair_stream

    cfg = load_config(write(tmp_path, MINIMAL), [f"output_dir={tmp_path / 'run'}", "train.stream=true"])
    pending = tmp_path / "run" / "pairs.partial"
    pending.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["p0"], "sample_index": [0]}), pending / "stream-0.parquet")
    lines = []
    assert pair_stream(cfg.student, cfg.context(), Inputs(student_path="s"), 0, log=lines.append) is None
    assert len(lines) == 1 and "train.stream does not stream this round again" in lines[0]


def test_a_rank_out_of_pairs_makes_zero_weight_steps_while_another_rank_has_some(monkeypatch):
    from plad_ray.train import stream_feed

    others = iter([True, True, True, False])  # what the other rank says: it has 3 steps more than this one's 1
    monkeypatch.setattr(stream_feed, "any_rank", lambda mine: mine or next(others))
    assert list(stream_feed.joined(iter(["s1"]))) == [("s1", False), ("s1", True), ("s1", True), ("s1", True)]
    others = iter([True])
    with pytest.raises(RuntimeError, match="a rank got no training pairs from the stream while another did"):
        list(stream_feed.joined(iter([])))


def test_a_streamed_round_gets_its_teacher_scores_after_its_pairs_are_committed(tmp_path, monkeypatch):
    """The wiring of pipeline.distill (each stage is tested on its own, on real Ray, vLLM and DeepSpeed; the
    streaming fault test runs one with real engines): with train.stream and teacher.score_samples the round's
    pairs are scored once committed. Before, a streamed round skipped the scoring without a word."""
    from plad_ray import pipeline
    from plad_ray.checks import Inputs

    calls = []
    monkeypatch.setattr(pipeline, "prepare", lambda *args, **kwargs: Inputs(num_prompts=4, student_path="s"))
    monkeypatch.setattr(pipeline, "generate_teacher", lambda *args: {})
    monkeypatch.setattr(pipeline, "pair_stream", lambda *args, round: calls.append(("stream", round)) or 1)
    monkeypatch.setattr(pipeline, "commit_pairs", lambda *args: calls.append(("commit", args[2])) or {"pairs": 4})
    monkeypatch.setattr(pipeline, "score_pairs", lambda *args: calls.append(("score", args[-1])) or {"rows": 6})
    monkeypatch.setattr(pipeline, "write_report", lambda cfg, rounds, figures, *args: {"rounds": rounds})
    monkeypatch.setattr(pipeline, "log_report", lambda *args: None)
    import plad_ray.train.driver as driver

    monkeypatch.setattr(
        driver,
        "train_student",
        lambda *args, round=1, stream=None: calls.append(("train", round, stream is not None)) or {"steps": 1},
    )
    cfg = load_config(
        write(tmp_path, MINIMAL), ["train.stream=true", "teacher.score_samples=true", "eval.enabled=false"]
    )
    report = pipeline.distill(cfg, log=lambda _: None)
    assert calls == [("stream", 1), ("train", 1, True), ("commit", 1), ("score", 1)]
    assert report["rounds"][0]["pair_generation"] == {"pairs": 4, "teacher_scoring": {"rows": 6}}
