"""cluster.shutdown ends the local cluster's process tree and nothing else of the job's own children."""

import subprocess
import textwrap

import pytest

from tests.conftest import PYTHON, ROOT, job_env

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent("""
    import subprocess, sys, psutil
    from plad_ray import cluster
    from plad_ray.config import ClusterConfig

    cluster.connect(ClusterConfig(num_cpus=1))
    ray_tree = [p for root in cluster._ray_processes for p in [root, *root.children(recursive=True)]]
    # a child of the job's own, started after Ray (as W&B's service is, which must outlive Ray to flush)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    cluster.shutdown(grace_s=2)
    print("ray processes", len(ray_tree), "alive", sum(p.is_running() and p.status() != "zombie" for p in ray_tree))
    print("other alive", other.poll() is None)
    other.kill()
""")


def test_shutdown_kills_rays_tree_and_leaves_the_jobs_other_children():
    proc = subprocess.run([PYTHON, "-c", SCRIPT], cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(
        line.rsplit(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("ray processes", "other"))
    )
    assert "other alive" in lines and lines["other alive"] == "True", proc.stdout
    ray_line = [line for line in proc.stdout.splitlines() if line.startswith("ray processes")][0].split()
    assert int(ray_line[2]) >= 2 and ray_line[4] == "0", proc.stdout  # gcs, raylet, ... all gone
