"""A real Ray head (and optional extra nodes) on loopback, owned by one test.

Started with `ray start`, free ports, token auth off (a local test cluster; see
ENVIRONMENT.md), and the venv's bin first on PATH so job entrypoints find this Python.
Every node gets its own temp dir, as every machine of a real cluster has its own disk:
nodes sharing one would share `session_*/runtime_resources`, and a node's runtime-env
agent, setting up a job's `working_dir` for its first task there, deletes and unpacks
that folder again (Ray's working_dir plugin overwrites), under the feet of a job driver
running in it on the head. Nodes start with the settings plad-ray's own local
cluster has (plad_ray.cluster.raylet_env: 16 idle workers kept, README "Small nodes"). Stopped by killing
the processes under its temp dirs; never `ray stop`, which would end every Ray cluster on the machine.
"""

import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from conftest import PYTHON, job_env

from plad_ray.cluster import raylet_env

RAY = str(Path(PYTHON).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    def __init__(self, num_cpus: int = 4):
        # Short path: Ray's Unix sockets live under the temp dir and paths are capped at 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="/tmp/plr-")
        self.temp_dirs = [self.temp_dir]  # the head's, then one per added node
        self.env = job_env()
        self.env.update(RAY_AUTH_MODE="disabled", PATH=f"{Path(PYTHON).parent}:{self.env['PATH']}", **raylet_env())
        self._start(self._head_args, num_cpus, self.temp_dir)

    def _head_args(self) -> list[str]:
        self.port = free_port()
        self.dashboard_port = free_port()
        return [
            "--head",
            f"--port={self.port}",
            f"--dashboard-port={self.dashboard_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--ray-client-server-port={free_port()}",
        ]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def add_node(self, num_cpus: int, resources: str | None = None, hide: str | None = None) -> None:
        """Another Ray node on this machine, joined to the head. `hide`: a folder this node sees empty (its
        processes run in their own mount namespace with a tmpfs over it), as a machine without a shared mount
        would."""
        extra = [f"--address={self.address}"] + ([f"--resources={resources}"] if resources else [])
        self.temp_dirs.append(tempfile.mkdtemp(prefix="/tmp/plr-"))
        self._start(lambda: extra, num_cpus, self.temp_dirs[-1], hide)

    def _start(self, args, num_cpus: int, temp_dir: str, hide: str | None = None, attempts: int = 3) -> None:
        """`ray start` with free ports. A port is free when picked and bound by Ray a moment later; another process
        on the machine (the tests' other Ray clusters bind ephemeral ports all the time) can take it in between, and
        Ray then fails with "timed out during startup". So a failed start is cleaned up and tried again with fresh
        ports; the last failure is raised with Ray's own output."""
        for _ in range(attempts):
            ports = [
                f"--{name}={free_port()}"
                for name in (
                    "node-manager-port",
                    "object-manager-port",
                    "dashboard-agent-listen-port",
                    "dashboard-agent-grpc-port",
                    "runtime-env-agent-port",
                    "metrics-export-port",
                )
            ]
            command = [
                RAY,
                "start",
                *args(),
                *ports,
                f"--num-cpus={num_cpus}",
                f"--temp-dir={temp_dir}",
                "--node-ip-address=127.0.0.1",
                "--disable-usage-stats",
            ]
            if hide is not None:
                command = [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    f"mount -t tmpfs plr-hidden {shlex.quote(hide)} && exec {shlex.join(command)}",
                ]
            started = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=180)
            if started.returncode == 0:
                return
            self._kill({temp_dir})
        raise RuntimeError(
            f"`ray start` failed {attempts} times; the last:\n{started.stdout[-2000:]}\n{started.stderr[-4000:]}"
        )

    def job(self, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
        return self.job_cli("job", *args, timeout=timeout)

    def job_cli(self, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        """A `ray` CLI command against this cluster (jobs, state API)."""
        return subprocess.run(
            [RAY, *args],
            env={**self.env, "RAY_ADDRESS": self.dashboard},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def processes(self, marker: str) -> list[int]:
        """This cluster's processes whose command line contains `marker` (Ray names actors ray::<Class>): below the
        processes that name our temp dirs (a worker renames itself, and its command line then names no folder)."""
        from support.fault import descendants, find_in

        ours = [int(p) for p in os.listdir("/proc") if p.isdigit() and self._ours(int(p), set(self.temp_dirs))]
        below = {pid for root in ours for pid in (root, *descendants(root))}
        return sorted(pid for pid in below if find_in(pid, marker))

    def stop(self) -> None:
        """Kill only this cluster's processes: those whose command line or environment names one of our temp dirs."""
        self._kill(set(self.temp_dirs))

    def _kill(self, temp_dirs: set[str]) -> None:
        for _ in range(3):
            pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and self._ours(int(p), temp_dirs)]
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(1)

    def _ours(self, pid: int, temp_dirs: set[str]) -> bool:
        """The process names one of our temp dirs in its command line or environment, or runs in one (a job's
        driver runs in Ray's copy of the job's working dir, under the head's temp dir)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes() if pid != os.getpid() else b""
            cwd = os.readlink(f"/proc/{pid}/cwd") if pid != os.getpid() else ""
        except OSError:
            return False
        return any(d.encode() in cmdline or d.encode() in env or cwd.startswith(d) for d in temp_dirs)
