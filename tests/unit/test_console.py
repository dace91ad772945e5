"""The terminal and the run's log file (plad_ray.console): worker lines and library logs go to the file,
plad-ray's own lines to the terminal too; --verbose shows everything."""

import logging

import pytest

from plad_ray import console


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(console, "_sink", None)
    monkeypatch.setattr(console, "_verbose", False)
    monkeypatch.setattr(console, "_recent", {})
    loggers = {
        name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level, logging.getLogger(name).propagate)
        for name in console.LIBRARIES
    }
    yield
    for name, (handlers, level, propagate) in loggers.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
    logging.captureWarnings(False)


class FakeRayWorker:
    def __init__(self):
        self.printed = []

    def print_to_stdstream(self, data, ignore_prefix):
        self.printed.append(data)


def batch(*lines, is_err=False):
    return {"lines": list(lines), "pid": 7, "ip": "10.0.0.2", "actor_name": "vLLMEngineStageUDF", "is_err": is_err}


def test_worker_lines_go_to_the_file_and_only_tagged_ones_to_the_terminal(fresh, tmp_path, capsys):
    console.quiet()
    ray = FakeRayWorker()
    console._worker_lines(
        batch("INFO 12-03 llm_engine.py: Initializing a V1 LLM engine", "[train] step 5/54 loss 0.7"), ray
    )
    logging.getLogger("vllm").info("driver-side vLLM chatter")
    console._worker_lines(batch("Traceback (most recent call last):", is_err=True), ray)
    out = capsys.readouterr()
    assert out.out == "[train] step 5/54 loss 0.7\n" and out.err == "" and ray.printed == []
    # Nothing is lost: lines wait in memory until the output folder is claimed, then go to logs/run.log.
    path = console.attach(str(tmp_path / "logs"))
    assert path == str(tmp_path / "logs" / "run.log")
    console._worker_lines(batch("after attach"), ray)
    console.close()
    text = (tmp_path / "logs" / "run.log").read_text()
    for line in (
        "(vLLMEngineStageUDF pid=7, ip=10.0.0.2) INFO 12-03 llm_engine.py: Initializing a V1 LLM engine",
        "(vLLMEngineStageUDF pid=7, ip=10.0.0.2) [train] step 5/54 loss 0.7",
        "INFO vllm: driver-side vLLM chatter",
        "(vLLMEngineStageUDF pid=7, ip=10.0.0.2) Traceback (most recent call last):",
        "(vLLMEngineStageUDF pid=7, ip=10.0.0.2) after attach",
    ):
        assert line in text
    assert console.log_path() == path


def test_verbose_shows_everything_and_still_writes_the_file(fresh, tmp_path, capsys):
    console.quiet(verbose=True)
    console.attach(str(tmp_path))
    ray = FakeRayWorker()
    console._worker_lines(batch("engine chatter"), ray)
    console.close()
    assert [d["lines"] for d in ray.printed] == [["engine chatter"]]  # Ray's own printer, with its prefix
    assert "engine chatter" in (tmp_path / "run.log").read_text()


def test_a_line_that_arrives_twice_is_shown_once(fresh, tmp_path, capsys):
    console.quiet()
    ray = FakeRayWorker()
    console._worker_lines(batch("[train] step 5/54 loss 0.7"), ray)
    console._worker_lines(batch("[train] step 5/54 loss 0.7", is_err=True), ray)
    console._worker_lines(batch("[train] step 10/54 loss 0.6", is_err=True), ray)
    out = capsys.readouterr()
    assert out.out == "[train] step 5/54 loss 0.7\n[train] step 10/54 loss 0.6\n" and out.err == ""
