"""Joining a Ray cluster, or starting a local one when none is given."""

import os

from plad_ray.config import ClusterConfig


def connect(cluster: ClusterConfig) -> str:
    """Join cluster.address (or $RAY_ADDRESS, as `ray job submit` sets), else start a local cluster.

    A local cluster gets `address="local"` so it never attaches to someone else's Ray
    on the same machine, and `num_cpus` logical CPUs: on a 2-core machine, Ray Data
    stages, vLLM engines and trainer workers need more logical CPUs than cores to
    be scheduled at the same time.
    """
    import ray

    if ray.is_initialized():
        return "already connected"
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return f"joined Ray cluster at {address}"
    ray.init(address="local", num_cpus=cluster.num_cpus, include_dashboard=False)
    return f"started a local Ray cluster ({ray.cluster_resources().get('CPU', 0):g} logical CPUs)"
