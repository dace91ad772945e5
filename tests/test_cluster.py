"""Resource plans a cluster cannot place are refused before anything waits on them."""

import pytest

from plad_ray.cluster import check_resources
from plad_ray.config import Config, StudentEngineConfig, TeacherEngineConfig, TrainConfig
from plad_ray.errors import ConfigError


def plan(**train) -> Config:
    return Config(output_dir="o", teacher=TeacherEngineConfig(model="t", replicas=2),
                  student=StudentEngineConfig(model="s"), train=TrainConfig(**train))


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
