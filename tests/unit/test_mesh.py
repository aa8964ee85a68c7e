"""The device mesh: -1 fills the remaining devices; sizes that do not multiply to the device
count fail with a ConfigError naming the key."""

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from nnxtrain.config import MeshConfig
from nnxtrain.errors import ConfigError
from nnxtrain.parallel.mesh import batch_sharding, build_mesh, data_parallel_size, mesh_shape
from nnxtrain.parallel.sharding import DEFAULT_RULES, logical_to_spec, merge_rules


@pytest.mark.parametrize(
    ("sizes", "devices", "expected"),
    [
        ((1, -1, 1), 8, (1, 8, 1)),
        ((2, -1, 1), 8, (2, 4, 1)),
        ((-1, 1, 1), 4, (4, 1, 1)),
        ((1, 2, -1), 8, (1, 2, 4)),
        ((1, -1, 1), 1, (1, 1, 1)),
        ((2, 2, 2), 8, (2, 2, 2)),  # no -1: taken as given when the product fits
    ],
)
def test_mesh_shape_fills_minus_one(sizes, devices, expected):
    assert mesh_shape(MeshConfig(*sizes), devices) == expected


@pytest.mark.parametrize(
    ("sizes", "devices", "key"),
    [
        ((2, 2, 1), 8, "mesh"),  # 4 != 8
        ((2, 2, 4), 8, "mesh"),  # 16 != 8
        ((1, 1, 1), 2, "mesh"),
        ((3, -1, 1), 8, "mesh.fsdp"),  # 8 devices do not split 3 ways
        ((-1, -1, 1), 8, "mesh.data, mesh.fsdp"),  # only one axis may be -1
    ],
)
def test_mesh_shape_rejects_sizes_that_do_not_fit(sizes, devices, key):
    with pytest.raises(ConfigError) as err:
        mesh_shape(MeshConfig(*sizes), devices)
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}: ")


def test_product_mismatch_message_names_the_sizes_and_the_device_count():
    with pytest.raises(ConfigError, match=r"2\*2\*1 = 4 but 8 devices"):
        mesh_shape(MeshConfig(2, 2, 1), 8)


def test_build_mesh_over_the_visible_devices():
    devices = jax.devices()
    mesh = build_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    assert dict(mesh.shape) == {"data": 1, "fsdp": len(devices), "tensor": 1}
    assert data_parallel_size(mesh) == len(devices)
    assert batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"), None)


def test_build_mesh_rejects_more_devices_than_visible():
    n = len(jax.devices())
    with pytest.raises(ConfigError) as err:
        build_mesh(MeshConfig(data=n + 1, fsdp=1, tensor=1))
    assert err.value.key == "mesh"


def test_one_device_is_counted_in_english():
    with pytest.raises(ConfigError, match=r"2\*1\*1 = 2 but 1 device is visible"):
        mesh_shape(MeshConfig(2, 1, 1), 1)


@pytest.mark.parametrize(
    ("rules", "match"),
    [
        ({"embed": 5}, r"unknown mesh axis 5"),  # was a TypeError ('int' is not iterable)
        ({"embed": ["fsdp", "fsdp"]}, r"names a mesh axis twice"),  # was JAX's DuplicateSpecError
        ({"embed": "fsdpp"}, r"unknown mesh axis 'fsdpp'"),
    ],
)
def test_bad_mesh_rules_name_the_rule(rules, match):
    with pytest.raises(ConfigError, match=match) as err:
        merge_rules(rules)
    assert err.value.key == "mesh.rules.embed"


def test_mesh_rules_override_the_defaults():
    rules = merge_rules({"embed": ["fsdp", "tensor"], "mlp": None, "vocab": "data"})
    assert rules["embed"] == ("fsdp", "tensor") and rules["mlp"] is None
    assert rules["vocab"] == ("data",) and rules["heads"] == DEFAULT_RULES["heads"]


def test_the_expert_axis_exists_only_when_asked_for_and_splits_the_batch():
    """mesh.expert=1 (the default) leaves the three-axis mesh as it was; another size adds
    the `expert` axis (a mixture of experts' expert parallelism), and the batch is split
    over it too."""
    assert mesh_shape(MeshConfig(1, -1, 1), 8) == (1, 8, 1)
    assert mesh_shape(MeshConfig(1, -1, 1, expert=4), 8) == (1, 2, 1, 4)
    with pytest.raises(ConfigError, match=r"data\*fsdp\*tensor\*expert = 1\*3\*1\*2 = 6"):
        mesh_shape(MeshConfig(1, 3, 1, expert=2), 8)
    mesh = AbstractMesh((1, 2, 1, 4), ("data", "fsdp", "tensor", "expert"))
    assert data_parallel_size(mesh) == 8
    assert batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp", "expert"), None)
    # a rule's axes the mesh lacks are left out: the default rules on a mesh without expert
    assert logical_to_spec(("expert", "embed"), DEFAULT_RULES, ("data", "fsdp", "tensor")) == (
        PartitionSpec(None, "fsdp")
    )
    assert logical_to_spec(("expert", "embed"), DEFAULT_RULES) == PartitionSpec("expert", "fsdp")
