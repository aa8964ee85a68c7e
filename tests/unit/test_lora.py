"""LoRA (issue 25) without torch: adapters that start as exactly zero, an optimizer that
moves them alone, adapter-only checkpoints that resume bitwise and name their base, the
base as a view with adapters off, and one line for bad `model.lora.*` keys.
PEFT/transformers parity is tests/interop/test_lora_peft.py."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, assert_one_line_error, run_cli_in_process
from flax import nnx
from rich.console import Console

from nnxtrain import Trainer, compose
from nnxtrain.checkpoint import open_manager
from nnxtrain.checkpoint.model import read_model
from nnxtrain.checkpoint.storage import read_meta
from nnxtrain.config import LoraConfig, ModelConfig, OptimConfig
from nnxtrain.interop.init_from import load_params
from nnxtrain.model import Transformer, adapters_off
from nnxtrain.model.lora import in_loop_cast
from nnxtrain.train.step import TrainState, make_optimizer, make_train_step, split_trainable

# Non-square everywhere (GQA k/v 16 wide, q 32, MLP 24 vs 16) and alpha/r = 1.5, not 1.
LORA = LoraConfig(rank=4, alpha=6.0)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 12)), jnp.int32)


def models(**kw: object) -> tuple[Transformer, Transformer]:
    """(the base, the same model and seed with adapters on every linear), scanned, remat."""
    cfg = dataclasses.replace(TINY, scan_layers=True, remat="full", **kw)  # type: ignore[arg-type]
    return build(cfg), build(dataclasses.replace(cfg, lora=LORA))


def build(cfg: ModelConfig) -> Transformer:
    """Transformer(cfg, seed 3), initialised in one compiled call (eager init dispatches
    hundreds of small ops, slow on a loaded CPU)."""
    return nnx.jit(lambda: Transformer(cfg, rngs=nnx.Rngs(3)))()


def randomize_b(model: Transformer) -> None:
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))):
        value = var.get_value()
        var.set_value(jax.random.normal(jax.random.key(i), value.shape, value.dtype) * 0.1)


@jax.jit
def forward(model: Transformer, tokens: jax.Array) -> jax.Array:
    return model(tokens)


def test_fresh_adapters_give_the_base_logits_bit_for_bit_and_adapters_off_is_the_base() -> None:
    base, lora = models()
    expected = np.asarray(forward(base, TOKENS))
    assert np.array_equal(np.asarray(forward(lora, TOKENS)), expected)
    randomize_b(lora)  # A and B both non-zero now: the adapters change the logits ...
    assert not np.allclose(np.asarray(forward(lora, TOKENS)), expected, atol=1e-3)
    view = adapters_off(lora)  # ... and the view without them is the base, bit for bit
    assert np.array_equal(np.asarray(forward(view, TOKENS)), expected)
    assert not np.allclose(np.asarray(forward(lora, TOKENS)), expected, atol=1e-3)  # untouched
    shared = {id(x) for x in jax.tree.leaves(nnx.state(lora))}
    assert {id(x) for x in jax.tree.leaves(nnx.state(view))} <= shared  # no copy of a weight


def test_base_dtype_holds_the_base_in_bfloat16_and_the_adapters_in_float32() -> None:
    cfg = dataclasses.replace(TINY, lora=dataclasses.replace(LORA, base_dtype="bfloat16"))
    lora = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    adapters = jax.tree.leaves(nnx.state(lora, nnx.LoRAParam))
    base = jax.tree.leaves(nnx.state(lora, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    assert {a.dtype for a in adapters} == {jnp.dtype("float32")}
    assert {b.dtype for b in base} == {jnp.dtype("bfloat16")}


RUN = ["model=tiny", "run.batch_size=4", "run.seq_len=16", "run.eval_every=0", "run.log_every=1"]
LORA_KEYS = ["model.lora.rank=4", "model.lora.alpha=6"]


def test_one_step_moves_only_the_adapters_and_the_optimizer_holds_only_theirs(tmp_path) -> None:
    cfg = compose(
        [
            *RUN,
            *LORA_KEYS,
            "run.steps=1",
            "optim.warmup_steps=0",
            "callbacks=none",
            f"run.dir={tmp_path}",
        ]
    )
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=True))
    trainer = Trainer(cfg)
    after = jax.device_get(trainer.fit().state)
    before = jax.device_get(trainer.plan.initialize().params)  # the same seed: step 0's
    moved, base_after = split_trainable(after.params, nnx.LoRAParam)
    start, base_before = split_trainable(before, nnx.LoRAParam)
    for a, b in zip(jax.tree.leaves(base_after), jax.tree.leaves(base_before), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # bitwise: no gradient, no update
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(start)[0]]
    changed = [
        n
        for n, a, b in zip(names, jax.tree.leaves(moved), jax.tree.leaves(start), strict=True)
        if not np.array_equal(np.asarray(a), np.asarray(b))
    ]
    assert any("'b'" in n for n in changed)  # B left zero: the adapters learn
    moments = jax.tree.leaves(after.opt_state)
    lora_elements = sum(x.size for x in jax.tree.leaves(start))
    # Adam's two moments over the adapters alone (plus scalar counters): no base state
    assert sum(np.size(x) for x in moments) < 2 * lora_elements + 8


def saved_bytes(run_dir: Path, step: int) -> tuple[int, dict]:
    """(bytes of the arrays checkpoint `step` holds, its meta)."""
    mngr = open_manager(str(run_dir / "checkpoints"), read_only=True)
    try:
        meta, saved = read_meta(mngr, step)
    finally:
        mngr.close()
    size = sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in saved.values())
    return size, meta


@pytest.mark.slow  # four real CLI runs: its group starts first under xdist
def test_resume_after_sigterm_is_bitwise_the_checkpoint_is_adapters_only_and_names_its_base(
    tmp_path,
) -> None:
    args = [*RUN, "run.steps=4", "callbacks.checkpoint.every=2"]
    signal = ["+callbacks.sig._target_=callbacks_for_tests.SignalAtStep", "+callbacks.sig.at=2"]
    runs = {
        "whole": [*args, *LORA_KEYS],
        "cut": [*args, *LORA_KEYS, *signal],
    }
    procs = {
        k: run_cli_in_process([*v, f"run.dir={tmp_path / k}"], tmp_path) for k, v in runs.items()
    }
    assert procs["cut"].returncode == 143, procs["cut"].stderr
    again = run_cli_in_process([*args, *LORA_KEYS, f"run.dir={tmp_path / 'cut'}"], tmp_path)
    assert again.returncode == 0 and procs["whole"].returncode == 0, again.stderr
    assert "resumed from step 2" in again.stdout
    # the header says what trains: the 14 adapters' elements, not the model's
    assert "LoRA r=4, alpha 6 on q_proj, k_proj, v_proj, o_proj, gate_proj" in again.stdout
    whole, whole_meta = saved_bytes(tmp_path / "whole", 4)
    _, cut_meta = saved_bytes(tmp_path / "cut", 4)
    assert whole_meta["digests"]["arrays"] == cut_meta["digests"]["arrays"]  # bitwise
    names = whole_meta["digests"]["arrays"]
    assert names and not [n for n in names if n.startswith("params/") and "_lora/" not in n]
    assert whole_meta["lora_base"]["seed"] == 0 and whole_meta["lora_base"]["init_from"] == ""
    # A full fine-tune's checkpoint holds every parameter and the optimizer state over
    # them all; this one holds them for the adapters alone: smaller by their share.
    cfg = compose([*RUN, *LORA_KEYS])
    base = nnx.state(nnx.eval_shape(lambda: Transformer(compose(RUN).model, rngs=nnx.Rngs(0))))
    lora = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
    adapters = nnx.state(lora, nnx.LoRAParam)
    tx, _ = make_optimizer(cfg.optim, 4)

    def nbytes(tree: object) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    full = nbytes(base) + nbytes(jax.eval_shape(tx.init, base)) + 4  # + the step counter
    assert whole < full
    assert whole / full == pytest.approx(nbytes(adapters) / nbytes(base), rel=0.02)

    # run.init_from=a LoRA run: the model it trained, its adapters merged into the base,
    # for a full fine-tune and for new adapters alike (which start at zero: the same logits).
    _, _, trained = read_model(str(tmp_path / "whole"))
    expected = np.asarray(forward(trained, TOKENS))
    starts = {}
    for extra in ([], LORA_KEYS):
        config = compose([*RUN, *extra, f"run.init_from={tmp_path / 'whole'}"])
        graphdef, fresh = nnx.split(
            nnx.eval_shape(lambda c=config: Transformer(c.model, rngs=nnx.Rngs(0)))
        )
        fresh = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), fresh)
        starts[len(extra)] = graphdef, load_params(config, fresh, None, Console(quiet=True))
    (graphdef, full), (_, lora_start) = starts[0], starts[len(LORA_KEYS)]
    model = nnx.merge(graphdef, full)
    # Merging reorders float32 sums (x W + s (x A) B against x (W + s A B)): logits of
    # size ~1 over sums of 32-64 products differ by a few 1e-7; 1e-5 is far above that.
    assert np.allclose(np.asarray(forward(model, TOKENS)), expected, rtol=0, atol=1e-5)
    base_wq = adapters_off(trained).layers.attn.wq.get_value()
    assert not np.array_equal(np.asarray(full["layers"]["attn"]["wq"].get_value()), base_wq)
    lora_base, _ = split_trainable(lora_start, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    for a, b in zip(jax.tree.leaves(lora_base), jax.tree.leaves(full), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))

    # The same run dir with another base (run.seed builds it) is refused, nothing removed.
    longer = [*RUN, "run.steps=6", *LORA_KEYS, "run.seed=1", f"run.dir={tmp_path / 'cut'}"]
    other = run_cli_in_process(longer, tmp_path)
    assert_one_line_error(other, "another base")
    steps = (tmp_path / "cut" / "checkpoints").iterdir()
    assert sorted(p.name for p in steps if p.name.isdigit()) == ["2", "4"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.lora.rank=-1", "model.lora.rank"),
        ("model.lora.targets=[q_proj,qkv_proj]", "model.lora.targets"),
        ("model.lora.dropout=1.5", "model.lora.dropout"),
        ("model.lora.base_dtype=int8", "model.lora.base_dtype"),
        ("model.lora.adapter=nowhere", "model.lora.adapter"),
    ],
)
def test_bad_lora_keys_are_one_line(tmp_path, override, key) -> None:
    proc = run_cli_in_process(["model=tiny", override, f"run.dir={tmp_path}"], tmp_path)
    assert_one_line_error(proc, key)


def test_dropout_masks_are_the_train_steps_own_per_step_and_micro_batch() -> None:
    lora = dataclasses.replace(LORA, dropout=0.5, targets=["down_proj"])  # one mask a layer
    model = build(dataclasses.replace(TINY, lora=lora))
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))):
        value = var.get_value()  # large B: dropping an adapter input moves the loss
        var.set_value(jax.random.normal(jax.random.key(i), value.shape, value.dtype))
    x = TOKENS[:1]
    logits = np.asarray(forward(model, x), np.float64)[0, :-1]  # eval, generation: no dropout
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    eval_loss = -np.mean(logp[np.arange(len(logp)), np.asarray(x)[0, 1:]])
    graphdef, params = nnx.split(model)
    tx, schedule = make_optimizer(OptimConfig(), 4)
    train, _ = split_trainable(params, nnx.LoRAParam)
    step = jax.jit(make_train_step(graphdef, tx, schedule, 0.0, 2, trainable=nnx.LoRAParam))

    def loss(at: int, second: str) -> float:
        # grad_accum=2, row i in micro-batch i: [x, x] or [x, padding] (weight 0, no loss)
        state = TrainState(jnp.asarray(at, jnp.int32), params, tx.init(train))
        rows = jnp.concatenate([x, x])
        weights = jnp.ones(rows.shape).at[1].set(0.0 if second == "padding" else 1.0)
        batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:], "weights": weights[:, 1:]}
        return float(step(state, batch)[1]["loss"])

    alone = loss(1, "padding")  # state and batch in, loss out: a pure function of them
    # The step's loss of x is not the eval's: the train step drops. Without dropout the two
    # agree to float32 rounding (measured 5e-8 of a loss near 3.5); dropout moved it 1e-2.
    assert abs(alone - eval_loss) > 1e-3
    # A step's masks are its own: a resume, its state restored bitwise (the SIGTERM test
    # below), draws the same.
    assert loss(1, "padding") == alone
    assert loss(2, "padding") != alone  # another step, other masks
    # Were the two micro-batches' masks one, [x, x] would give x's loss under it bit for bit
    # ((s + s) / 2w is s / w exactly); each draws its own, so they differ.
    assert loss(1, "x") != alone


def test_the_in_loop_cast_is_a_plain_cast_bit_for_bit() -> None:
    """`in_loop_cast` (the frozen base's and adapters' cast kept inside the layer loop, see
    docs/lora.md "Memory") rounds first: its result must still be the plain cast's, for
    ties, subnormals, the largest floats, infinities and NaN too."""
    rng = np.random.default_rng(0)
    special = np.asarray(
        [0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-40, -1e-42, 1.17549435e-38],
        np.float32,
    )
    # ties: exactly halfway between two bfloat16 numbers (the low 16 bits 0x8000)
    ties = (rng.integers(0, 2**15, 64, np.uint32) << 16 | 0x8000).view(np.float32)
    values = np.concatenate([special, ties, rng.normal(0, 1, 4096).astype(np.float32)])

    def bits(a: np.ndarray) -> np.ndarray:
        return a.view(np.uint16 if a.itemsize == 2 else np.uint32)

    for x in (jnp.asarray(values), jnp.asarray(values).astype(jnp.bfloat16)):
        for dtype in (jnp.bfloat16, jnp.float32):
            got = np.asarray(jax.jit(in_loop_cast, static_argnums=1)(x, dtype))
            want = np.asarray(x.astype(dtype))
            nan = np.isnan(want.astype(np.float32))
            assert np.array_equal(np.isnan(got.astype(np.float32)), nan)
            assert np.array_equal(bits(got[~nan]), bits(want[~nan])), (x.dtype, dtype)
