"""The terminal and the run's log file: what a user sees, and where everything else goes.

By default the terminal shows plad-ray's own lines (tagged `[plad-ray]`, `[generate]`,
`[train]`, `[eval]`, `[pretrained]`, from the driver or any worker), Ray Data's progress, and
the summary. The rest goes to one file, `output_dir/logs/run.log`:

- every line Ray forwards from its workers (vLLM engines, Ray Data tasks, Ray Train
  controller and DeepSpeed ranks), with Ray's `(name pid=..., ip=...)` prefix;
- the driver's library loggers (ray, vllm, deepspeed, transformers, torch) and Python warnings.

`--verbose` shows all of it live as well. The file's path is printed once. Until the run's
output folder is ready (`attach`; `--overwrite` may clear it first) lines wait in memory; a URI
output_dir gets the file at `close`, written locally meanwhile.

Ray's worker-log forwarding is replaced through its dispatcher of worker standard streams
(`ray._private.ray_logging.global_worker_stdstream_dispatcher`, the hook Ray's own printer
registers with): Ray has no public option to send worker logs to a file of the driver's choosing
while still forwarding some of them.
"""

import logging
import os
import sys
import tempfile
import threading

TAGS = ("[plad-ray]", "[generate]", "[train]", "[eval]", "[pretrained]")
LIBRARIES = (
    "ray",
    "ray.data",
    "ray.llm",
    "ray.train",
    "vllm",
    "deepspeed",
    "DeepSpeed",
    "transformers",
    "torch",
    "py.warnings",
    "filelock",
    "urllib3",
    "mlflow",
    "wandb",
    "alembic",
)
LOG_NAME = "run.log"


class _Sink:
    """One log file for the run: buffered until attached to the output folder."""

    def __init__(self):
        self.lock = threading.Lock()
        self.buffer: list[str] = []
        self.file = None
        self.local_path: str | None = None
        self.upload_to: str | None = None

    def write(self, text: str) -> None:
        with self.lock:
            if self.file is None:
                self.buffer.append(text)
            else:
                self.file.write(text)
                self.file.flush()

    def attach(self, folder: str) -> str:
        from plad_ray.data import storage

        with self.lock:
            if self.file is not None:
                return self.shown()
            if storage.is_uri(folder):
                self.local_path = os.path.join(tempfile.mkdtemp(prefix="plad-ray-logs-"), LOG_NAME)
                self.upload_to = storage.join(folder, LOG_NAME)
            else:
                os.makedirs(folder, exist_ok=True)
                self.local_path = os.path.join(folder, LOG_NAME)
            self.file = open(self.local_path, "a")
            self.file.writelines(self.buffer)
            self.file.flush()
            self.buffer = []
            return self.shown()

    def shown(self) -> str:
        return self.upload_to or self.local_path or ""

    def close(self) -> None:
        with self.lock:
            if self.file is None:
                return
            self.file.close()
            self.file = None
            if self.upload_to:
                from plad_ray.data import storage

                with open(self.local_path, "rb") as f:
                    storage.write_bytes(self.upload_to, f.read())


_sink: _Sink | None = None
_verbose = False


def quiet(verbose: bool = False) -> None:
    """Route the driver's library logs and Python warnings to the run's log file (and, with verbose, to the
    terminal too). Call once, before the libraries log; idempotent."""
    global _sink, _verbose
    if _sink is not None:
        return
    _sink, _verbose = _Sink(), verbose
    logging.captureWarnings(True)
    route_libraries()


def route_libraries() -> None:
    """Every logger that writes to the terminal (libraries install their handlers when imported: Ray, Ray Data,
    vLLM) is re-routed to the log file. Called after each heavy import (cluster.connect, engines, training)."""
    if _sink is None:
        return
    handler = logging.StreamHandler(_SinkStream())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    names = set(LIBRARIES) | {
        name
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and _terminal_handlers(logger)
    }
    for name in sorted(names):
        _route(logging.getLogger(name), handler)


def _terminal_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [
        h
        for h in logger.handlers
        if isinstance(h, logging.StreamHandler)
        and getattr(h, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    ]


def _route(logger: logging.Logger, handler: logging.Handler) -> None:
    """Terminal handlers of this logger become the sink (kept too, when verbose)."""
    terminal = _terminal_handlers(logger)
    if not _verbose:
        for h in terminal:
            logger.removeHandler(h)
    if not any(isinstance(h.stream, _SinkStream) for h in logger.handlers if isinstance(h, logging.StreamHandler)):
        if terminal or not logger.handlers:
            logger.addHandler(handler)
            if logger.level == logging.NOTSET or logger.level > logging.INFO:
                logger.setLevel(logging.INFO)
            logger.propagate = False


class _SinkStream:
    def write(self, text: str) -> None:
        if _sink is not None:
            _sink.write(text)

    def flush(self) -> None:
        pass


def forward_worker_logs() -> None:
    """After ray.init: worker lines go to the log file; tagged ones (and all, when verbose) to the terminal."""
    if _sink is None:
        return
    from ray._private import ray_logging, worker

    dispatcher = ray_logging.global_worker_stdstream_dispatcher
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("plad_ray_logs")
    dispatcher.add_handler("plad_ray_logs", lambda data: _worker_lines(data, worker))
    # The raylet's messages to the driver (worker start-up warnings, OOM kills) take Ray's printer directly.
    if not getattr(worker.print_to_stdstream, "plad_ray", False):
        ray_print = worker.print_to_stdstream

        def print_to_stdstream(data, ignore_prefix):
            _sink.write("".join(f"({data.get('pid')}) {line}\n" for line in data.get("lines") or []))
            if _verbose:
                ray_print(data, ignore_prefix)

        print_to_stdstream.plad_ray = True
        print_to_stdstream.__wrapped__ = ray_print
        worker.print_to_stdstream = print_to_stdstream


def _worker_lines(data: dict, worker) -> None:
    """One batch of a worker's lines (Ray's log monitor): all to the file, ours (or all, verbose) to the terminal."""
    prefix = (
        f"({data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')}, ip={data.get('ip')}) "
    )
    lines = data.get("lines") or []
    _sink.write("".join(prefix + line + "\n" for line in lines))
    if _verbose:
        getattr(worker.print_to_stdstream, "__wrapped__", worker.print_to_stdstream)(data, ignore_prefix=False)
        return
    # A Ray Train worker's line reaches the driver twice (its stdout, and its logging mirror on stderr).
    ours = [line for line in lines if line.lstrip().startswith(TAGS) and not _seen(line)]
    if ours:  # on stdout whichever stream they came on: Ray Train's copies on both race
        print("\n".join(ours), flush=True)


_recent: dict[str, None] = {}


def _seen(line: str) -> bool:
    """Whether this tagged line was just shown (bounded memory: the last 1,000 lines)."""
    if line in _recent:
        return True
    _recent[line] = None
    if len(_recent) > 1000:
        del _recent[next(iter(_recent))]
    return False


def attach(folder: str) -> str | None:
    """The run's output folder is ready: the log file goes to `folder`/run.log; its path (once)."""
    return _sink.attach(folder) if _sink is not None else None


def log_path() -> str | None:
    """The run's log file, once attached (also after close)."""
    return (_sink.shown() or None) if _sink is not None else None


def close() -> None:
    if _sink is not None:
        _sink.close()
