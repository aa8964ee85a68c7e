"""Checkpoint integrity (issue 13): what changed on disk after a save is refused like an
unreadable checkpoint, never restored; and the digests that catch it.

Orbax checksums its index but not the array bytes, so a byte changed in a data file used
to resume silently on changed values. The tiny model for a few steps on one CPU device;
shardings are compared in a subprocess with 4 simulated devices.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import flip_one_bit_in_the_largest_data_file, xla_flags
from nnxtrain.plugins.checkpointer import Checkpointer
from rich.console import Console

from nnxtrain import Trainer, UserError, compose
from nnxtrain.checkpoint import digest
from nnxtrain.checkpoint.model import read_model

BASE = ["model=tiny", "run.batch_size=4", "run.seq_len=16", "run.eval_every=0", "callbacks=none"]
FIX = "; set callbacks.Checkpointer.fallback=true to restore the previous one"


def fit(run_dir: Path, *callbacks: Any, overrides: tuple[str, ...] = ()) -> tuple[Any, str]:
    out = io.StringIO()
    cfg = compose([*BASE, *overrides, f"run.dir={run_dir}"])
    result = Trainer(cfg, list(callbacks), console=Console(file=out, width=400)).fit()
    return result, out.getvalue()


def steps_on_disk(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints of steps 4 and 8."""
    run_dir = tmp_path_factory.mktemp("saved")
    fit(run_dir, Checkpointer(every=4, if_busy="wait"), overrides=("run.steps=8",))
    assert steps_on_disk(run_dir) == [4, 8]
    return run_dir


@pytest.fixture
def copy(saved: Path, tmp_path: Path) -> Path:
    shutil.copytree(saved / "checkpoints", tmp_path / "checkpoints")
    return tmp_path


def test_a_flipped_bit_in_array_data_is_an_error_naming_the_array(copy):
    flip_one_bit_in_the_largest_data_file(copy / "checkpoints" / "8")
    with pytest.raises(UserError) as err:
        fit(copy, Checkpointer(), overrides=("run.steps=10",))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {copy}/checkpoints/8 is unreadable (corrupt data: ")
    assert "differs from the digest saved with it)" in message and message.endswith(FIX)
    assert steps_on_disk(copy) == [4, 8]  # nothing moved or deleted without fallback


def test_with_fallback_a_flipped_bit_restores_the_previous_checkpoint(copy):
    flip_one_bit_in_the_largest_data_file(copy / "checkpoints" / "8")
    result, text = fit(copy, Checkpointer(fallback=True), overrides=("run.steps=10",))
    assert "checkpoints/8 is unreadable (corrupt data: " in text
    assert "falling back to step 4" in text and "resumed from step 4" in text
    assert "moved the unreadable checkpoint(s) aside: 8.unreadable-" in text
    assert result.step == 10 and steps_on_disk(copy) == [4, 10]


def _edit_meta(step_dir: Path, edit: Any) -> None:
    path = step_dir / "meta" / "metadata"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def test_an_edited_meta_json_is_unreadable(copy):
    _edit_meta(copy / "checkpoints" / "8", lambda m: m["config"]["run"].update(seed=7))
    with pytest.raises(UserError, match=r"checkpoints/8 is unreadable \(ValueError: meta/ dif"):
        fit(copy, Checkpointer(), overrides=("run.steps=10",))


def test_a_renamed_step_folder_is_unreadable(copy):
    os.rename(copy / "checkpoints" / "8", copy / "checkpoints" / "9")
    with pytest.raises(UserError, match=r"checkpoints/9 is unreadable .*holds step 8"):
        fit(copy, Checkpointer(), overrides=("run.steps=10",))


def test_a_checkpoint_saved_without_digests_restores_with_a_warning(copy):
    _edit_meta(copy / "checkpoints" / "8", lambda m: [m.pop("digests"), m.pop("crc32")])
    _, text = fit(copy, Checkpointer(), overrides=("run.steps=10",))
    assert "checkpoints/8 has no digests (saved by an older nnxtrain): not verified" in text
    assert "resumed from step 8" in text


def test_readers_of_parameters_check_the_digests_too(copy):
    """run.init_from, nnxtrain-export and nnxtrain-generate all read through read_params."""

    def change_a_param_digest(meta: dict[str, Any]) -> None:
        rows = meta.pop("digests")["arrays"]
        meta.pop("crc32")
        name = next(n for n in sorted(rows) if n.startswith("params/"))
        rows[name] = [rows[name][0] ^ 1, rows[name][1]]
        meta.update(digest.seal(meta, rows))  # a meta that is whole: only the array differs

    _edit_meta(copy / "checkpoints" / "8", change_a_param_digest)
    with pytest.raises(UserError, match=r"checkpoints/8 is unreadable \(corrupt data: params/"):
        read_model(str(copy))
    ckpt, _, model = read_model(str(copy), 4)  # the untouched step reads
    assert ckpt.step == 4 and np.isfinite(np.asarray(model.embed[...])).all()


def test_digests_catch_any_changed_element_and_what_linear_sums_miss():
    x = np.asarray(jax.random.normal(jax.random.key(0), (64, 48)), np.float32)
    base = digest.digests([jnp.asarray(x)])[0]
    for i, j in [(0, 0), (3, 5), (63, 47)]:
        one = x.copy()
        one.view(np.uint32)[i, j] ^= 1  # the lowest mantissa bit of one element
        assert digest.digests([jnp.asarray(one)])[0][0] != base[0]
    signs = x.copy()
    signs[3, 5], signs[10, 1] = -signs[3, 5], -signs[10, 1]
    total, mixed = digest.digests([jnp.asarray(signs)])[0]
    assert total == base[0] and mixed != base[1]  # two sign flips cancel in the plain sum
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert digest.digests([jnp.asarray(swapped)])[0][1] != base[1]
    # bfloat16: +1 in one element's high byte, -1 in the next one's: 4 contiguous bytes
    # whose changes would cancel in a sum of the elements, not in the sum of 32-bit words
    half = jnp.asarray(x[:2, :2]).astype(jnp.bfloat16)
    bits = np.asarray(jax.lax.bitcast_convert_type(half, jnp.uint16)).copy()
    bits[0, 0], bits[0, 1] = bits[0, 0] + 256, bits[0, 1] - 256
    changed = jax.lax.bitcast_convert_type(jnp.asarray(bits), jnp.bfloat16)
    assert digest.digests([changed])[0][0] != digest.digests([half])[0][0]


SHARDINGS = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from nnxtrain.checkpoint.digest import digests

    mesh = jax.make_mesh((2, 2), ("a", "b"))
    x = jax.random.normal(jax.random.key(0), (64, 48))
    leaves = [x, x.astype(jnp.bfloat16), jnp.arange(12, dtype=jnp.int32), jnp.int32(7),
              jnp.array([True, False, True]), jax.random.split(jax.random.key(1), 4)]
    specs = [[None] * 6, [P("a", "b"), P("b", None), P("a"), P(), P(), P("b")],
             [P(None, ("a", "b")), P(("b", "a")), P(), P(), P(), P()]]
    out = []
    for spec in specs:
        placed = [v if s is None else jax.device_put(v, NamedSharding(mesh, s))
                  for v, s in zip(leaves, spec)]
        out.append({"digests": digests(placed),
                    "devices": [len(v.sharding.device_set) for v in placed]})
    print("RESULT=" + json.dumps(out))
    """
)


def test_digests_are_equal_across_shardings_and_dtypes_are_covered(tmp_path):
    env = {**os.environ, "XLA_FLAGS": xla_flags(4), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", SHARDINGS], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT="))
    single, two_d, flat = json.loads(line.removeprefix("RESULT="))
    assert single["devices"] == [1] * 6 and two_d["devices"][:2] == [4, 4]
    assert single["digests"] == two_d["digests"] == flat["digests"]
    assert len({tuple(d) for d in single["digests"]}) == 6  # no two leaves collide
