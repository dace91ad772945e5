"""Resource plans a cluster cannot place are refused before anything waits on them."""

import pytest

from plad_ray.cluster import check_resources
from plad_ray.config import Config, StudentEngineConfig, TeacherEngineConfig, TrainConfig
from plad_ray.errors import ConfigError


def plan(**train) -> Config:
    return Config(
        output_dir="o",
        teacher=TeacherEngineConfig(model="t", replicas=2),
        student=StudentEngineConfig(model="s"),
        train=TrainConfig(**train),
    )


def test_fits_exactly():
    # Teacher 2 replicas x 1 CPU = 2 <= 3; training 2 workers x 1 CPU + 1 data CPU = 3 <= 3.
    check_resources(plan(num_workers=2), {"CPU": 3.0})


def test_training_must_leave_a_cpu_for_its_data():
    with pytest.raises(ConfigError, match="config key train.num_workers: 3 workers x 1 CPUs plus 1 CPU"):
        check_resources(plan(num_workers=3), {"CPU": 3.0})
    check_resources(plan(num_workers=3), {"CPU": 3.0}, training=False)  # generation alone fits


def test_engine_replicas_and_gpus():
    with pytest.raises(ConfigError, match="config key teacher.replicas: 2 replicas"):
        check_resources(plan(num_workers=1), {"CPU": 1.5})
    gpu = plan(num_workers=2)
    gpu.cluster.use_gpu = True
    gpu.teacher.tensor_parallel_size = 2
    with pytest.raises(ConfigError, match="2 replicas x TP 2 need 4 GPUs"):
        check_resources(gpu, {"CPU": 64.0, "GPU": 2.0})
    check_resources(gpu, {"CPU": 64.0, "GPU": 4.0})


def test_a_replica_and_a_worker_must_fit_one_node():
    """Tensor parallelism and a trainer rank run within a node: cluster totals are not enough."""
    gpu = plan(num_workers=2)
    gpu.cluster.use_gpu = True
    gpu.teacher.tensor_parallel_size, gpu.teacher.replicas, gpu.teacher.cpus_per_replica = 3, 5, 1
    two_nodes = [{"CPU": 32.0, "GPU": 8.0}, {"CPU": 32.0, "GPU": 8.0}]
    totals = {"CPU": 64.0, "GPU": 16.0}
    # 5 x TP 3 = 15 GPUs fit the 16 in total, but a node holds 2 replicas (6 of its 8 GPUs): 4 in all
    with pytest.raises(
        ConfigError,
        match=r"config key teacher.replicas: 5 replicas of 3 CPUs and 3 GPUs each, but "
        r"the cluster's nodes hold 4 \(32 CPUs, 8 GPUs; 32 CPUs, 8 GPUs\)",
    ):
        check_resources(gpu, totals, nodes=two_nodes)
    gpu.teacher.replicas = 4
    check_resources(gpu, totals, nodes=two_nodes)
    check_resources(gpu, totals)  # one node of 16 GPUs would hold 5: the per-node rule is what refuses
    gpu.teacher.replicas, gpu.teacher.tensor_parallel_size = 1, 16  # 16 GPUs in total, 8 a node
    with pytest.raises(ConfigError, match="config key teacher.tensor_parallel_size: one replica's 16 worker"):
        check_resources(gpu, totals, nodes=two_nodes)
    gpu.teacher.tensor_parallel_size = 1
    gpu.train.cpus_per_worker = 20  # 2 x 20 (+ 1 for the data) of 64 CPUs, but no node has 20
    with pytest.raises(
        ConfigError,
        match="config key train.num_workers: 2 workers of 20 CPUs and 1 GPUs each do not fit on the cluster's nodes",
    ):
        check_resources(gpu, totals, nodes=[{"CPU": 16.0, "GPU": 4.0}] * 4)


def test_engines_sharing_a_gpu():
    gpu = plan(num_workers=1)
    gpu.cluster.use_gpu = True
    gpu.student.replicas, gpu.student.gpus_per_worker, gpu.student.gpu_memory_utilization = 16, 0.5, 0.45
    check_resources(gpu, {"CPU": 64.0, "GPU": 8.0})  # 16 x 0.5 = 8 GPUs
    gpu.student.replicas = 17
    with pytest.raises(ConfigError, match=r"config key student.replicas: 17 replicas x TP 1 x 0.5 GPUs need 8.5 GPUs"):
        check_resources(gpu, {"CPU": 64.0, "GPU": 8.0})
