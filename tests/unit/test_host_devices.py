"""`run.host_devices=-1` (auto): how many CPU devices a run asks JAX for."""

import pytest

from nnxtrain import compose
from nnxtrain.parallel.distributed import AUTO_MAX_CPU_DEVICES, auto_host_devices


def auto(*overrides: str, cores: int = 2) -> int:
    return auto_host_devices(compose(list(overrides)), cores=cores)


def test_one_device_per_core_when_the_batch_splits(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert auto("run.batch_size=12", cores=2) == 2
    assert auto("run.batch_size=12", cores=4) == 4
    assert auto("run.batch_size=12", cores=5) == 4  # the most devices that split 12
    assert auto("run.batch_size=7", cores=2) == 0  # odd batch: JAX's single device
    assert auto("run.batch_size=-1", cores=3) == 3  # one sequence per device


def test_the_micro_batch_must_split(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert auto("run.batch_size=12", "run.grad_accum=2", cores=4) == 3  # 6 sequences
    assert auto("run.batch_size=10", "run.grad_accum=2", cores=4) == 0  # 5 sequences


def test_fixed_axes_and_a_tensor_axis(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert auto("mesh.data=2", "mesh.fsdp=-1", "run.batch_size=4", cores=8) == 4
    assert auto("mesh.data=3", "mesh.fsdp=-1", "run.batch_size=12", cores=2) == 0
    # The batch splits over data x fsdp only: a filled tensor axis does not split it.
    assert auto("mesh.fsdp=1", "mesh.tensor=-1", "run.batch_size=1", cores=4) == 4


def test_at_most_the_cap_on_big_hosts(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert auto("run.batch_size=64", cores=64) == AUTO_MAX_CPU_DEVICES


@pytest.mark.parametrize(
    "mesh, expected",
    [
        (["mesh=single"], 1),
        (["mesh.fsdp=8"], 8),
        (["mesh.data=2", "mesh.fsdp=1", "mesh.tensor=2"], 4),
    ],
)
def test_a_fully_given_mesh_gets_its_size(mesh, expected):
    assert auto(*mesh, "run.batch_size=8", cores=2) == expected


def test_xla_flags_and_multi_process_runs_keep_jax_default(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert auto("run.batch_size=12") == 0
    monkeypatch.delenv("XLA_FLAGS")
    assert auto("mesh.num_processes=2", "mesh.coordinator=127.0.0.1:1234") == 0
