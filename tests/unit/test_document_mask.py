"""data.document_mask: which runs keep packed documents apart, the segments text and tokens
give, the batches the steps are compiled for, and the loss the steps compute from them.

The model side (attention confined to a segment, logits of a packed document equal to the
document run alone) is tests/unit/test_model_segments.py; here the steps are checked end to
end through `step.forward`: the loss of a packed batch is the token-weighted mean of each
document's loss alone, prompt targets do nothing, and gradient accumulation keeps segments.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY, assert_equal_to_rounding, rounding_tolerance
from flax import nnx

from nnxtrain import compose
from nnxtrain.data import (
    DocumentData,
    PackedData,
    SyntheticData,
    TokenStream,
    build_dataset,
    document_mask,
)
from nnxtrain.data.documents import Documents
from nnxtrain.errors import ConfigError
from nnxtrain.model import Transformer
from nnxtrain.parallel.mesh import build_mesh
from nnxtrain.train.feed import BATCH_DTYPES, DOCUMENT_DTYPES, Feed
from nnxtrain.train.loss import forward, loss_sums
from nnxtrain.train.step import TrainState, make_train_step

EOS = 0
SEQ = 16
# init_std well above the default so that the logits depend on the context: a leak across
# documents then shows far above rounding
MODEL = dataclasses.replace(TINY, max_len=SEQ, init_std=0.3)


# -- config: auto per kind ---------------------------------------------------------------


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def data_files(tmp_path) -> dict[str, list[str]]:
    """Overrides for one small run of each kind (eval off: no held-out split needed)."""
    text = write(tmp_path / "a.txt", "one document\n\nand another one\n" * 20)
    records = [{"prompt": "q", "completion": "an answer"}] * 8
    jsonl = write(tmp_path / "a.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    np.save(tmp_path / "t.npy", np.arange(500, dtype=np.uint16) % 200)  # no meta.json
    common = ["run.eval_every=0", "run.seq_len=16", "run.batch_size=2"]
    return {
        "synthetic": common,
        "text": ["data=text", f"data.path={text}", *common],
        "jsonl": ["data=jsonl", f"data.path={jsonl}", *common],
        "tokens": ["data=tokens", f"data.path={tmp_path / 't.npy'}", *common],
    }


def test_auto_is_on_where_the_documents_are_known(tmp_path):
    runs = data_files(tmp_path)
    on = {kind: build_dataset(compose(o)).document_mask for kind, o in runs.items()}
    # tokens without meta.json or a tokenizer: no EOS id, so no documents
    assert on == {"synthetic": False, "text": True, "jsonl": True, "tokens": False}
    tokens_with_eos = build_dataset(compose([*runs["tokens"], "data.eos_token=7"]))
    assert tokens_with_eos.document_mask and tokens_with_eos.eos_id == 7
    for kind in ("text", "jsonl", "tokens"):  # false turns it off everywhere
        assert not build_dataset(compose([*runs[kind], "data.document_mask=false"])).document_mask


def test_true_without_documents_is_a_one_line_error(tmp_path):
    runs = data_files(tmp_path)
    with pytest.raises(ConfigError) as e:
        compose(["data.document_mask=true"])  # synthetic
    assert e.value.key == "data.document_mask" and "data.document_mask=auto" in e.value.fix
    with pytest.raises(ConfigError) as e:
        build_dataset(compose([*runs["tokens"], "data.document_mask=true"]))
    assert e.value.key == "data.document_mask" and "data.eos_token" in e.value.fix
    with pytest.raises(ConfigError) as e:
        compose([*runs["text"], "data.document_mask=maybe"])
    assert e.value.key == "data.document_mask"
    with pytest.raises(ConfigError) as e:  # no tokenizer to look a token's text up in
        build_dataset(compose([*runs["tokens"], "data.eos_token=eos"]))
    assert e.value.key == "data.eos_token"
    assert document_mask(compose([*runs["text"], "data.document_mask=true"]))


# -- text and tokens: segments restart after each EOS -------------------------------------


def packed(tokens: list[int], mask: bool = True, **kw) -> PackedData:
    stream = TokenStream([np.array(tokens, np.uint16)])
    kw = {"shuffle": False, "prefetch": 0, **kw}
    return PackedData(
        stream,
        None,
        kind="test",
        seed=0,
        eos_id=EOS,
        vocab_size=32,
        id_limit=32,
        document_mask=mask,
        **kw,
    )


def test_a_segment_restarts_after_each_eos_and_padding_is_segment_0():
    #        doc 1 ... EOS | doc 2 ........ EOS | doc 3 | window 2: doc 3 .. EOS | doc 4
    stream = [5, 6, 7, EOS, 8, 9, 10, 11, 12, EOS, 13, 14, 15, 16, 17, EOS, 20, EOS]
    data = packed(stream)
    b = data.batch(0, 2, 10)
    assert b["inputs"][0].tolist() == stream[:10]
    assert b["segment_ids"][0].tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 2, 2]  # EOS ends its own
    assert b["positions"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    # window 2 starts inside document 3: it is this row's segment 1, from position 0; the
    # stream ends two places before the row does: padding, segment 0
    assert b["inputs"][1].tolist() == [*stream[10:], EOS, EOS]
    assert b["segment_ids"][1].tolist() == [1, 1, 1, 1, 1, 1, 2, 2, 0, 0]
    assert b["positions"][1].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 0, 0]
    # tokens/s counts the places whose target is a real token
    assert data.count_tokens(0, 2, 10) == 10 + 7 == int(b["weights"].sum())
    assert set(packed(stream, mask=False).batch(0, 2, 10)) == set(BATCH_DTYPES)


def test_text_documents_are_files_or_separator_pieces(tmp_path):
    a = write(tmp_path / "a.txt", "ab\n\ncd")
    b = write(tmp_path / "b.txt", "efg")
    text = ["data=text", f"data.path=[{a},{b}]", "data.doc_separator='\\n\\n'"]
    run = ["run.seq_len=9", "run.eval_every=0", "data.val_fraction=0", "run.batch_size=1"]
    cfg = compose([*text, *run, "data.shuffle=false"])
    data = build_dataset(cfg)
    row = data.batch(0, 1, 9)
    eos = data.eos_id
    assert row["inputs"][0].tolist() == [*b"ab", eos, *b"cd", eos, *b"efg"]
    assert row["segment_ids"][0].tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert row["positions"][0].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert "document mask on" in data.describe() and "packing efficiency" in data.describe()


def test_batches_stay_a_pure_function_of_seed_and_step():
    stream = (np.arange(2000) * 7 % 31).tolist()  # EOS (0) every 31 tokens
    one, two = packed(stream, shuffle=True), packed(stream, shuffle=True)
    two.batch(5, 4, SEQ)  # another order of requests, and prefetching
    for step in (3, 0, 9):
        a, b = one.batch(step, 4, SEQ), two.batch(step, 4, SEQ)
        assert set(a) == set(BATCH_DTYPES) | set(DOCUMENT_DTYPES)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


# -- the feed ---------------------------------------------------------------------------


def test_the_feed_spec_has_segments_only_with_the_mask_on():
    mesh = build_mesh(compose(["mesh=single"]).mesh, jax.devices()[:1])
    stream = (np.arange(400) * 7 % 31).tolist()
    for data, keys in [
        (packed(stream), set(BATCH_DTYPES) | set(DOCUMENT_DTYPES)),
        (packed(stream, mask=False), set(BATCH_DTYPES)),
        (SyntheticData(32, 4, 1, 0), set(BATCH_DTYPES)),
    ]:
        feed = Feed(data, mesh, batch_size=2, seq_len=SEQ)
        spec, batch = feed.spec(), feed.train(0)
        assert set(spec) == set(batch) == keys
        for k in keys:
            assert batch[k].dtype == spec[k].dtype and batch[k].shape == spec[k].shape
    # tokens/s: the non-padding places, as the batch itself shows them
    docs = packed_docs(documents())
    feed = Feed(docs, mesh, batch_size=2, seq_len=SEQ)
    for step in range(3):
        real = int((np.asarray(feed.train(step)["segment_ids"]) > 0).sum())
        assert feed.count_tokens(step) == real < 2 * SEQ
    assert Feed(object(), mesh, batch_size=2, seq_len=SEQ).count_tokens(0) == 2 * SEQ


# -- the steps on packed documents ---------------------------------------------------------


def documents(seed: int = 0) -> Documents:
    """Prompt/completion-like documents of 3..12 tokens: the first half of each is the
    prompt (no loss), the rest counts."""
    rng = np.random.default_rng(seed)
    ids, loss = [], []
    for n in rng.integers(3, 13, size=9):
        ids.append(np.concatenate([rng.integers(1, MODEL.vocab_size, n - 1), [EOS]]))
        loss.append(np.arange(n) >= n // 2)
    return Documents.build(ids, loss)


def packed_docs(docs: Documents) -> DocumentData:
    return DocumentData(
        docs, None, seq_len=SEQ, seed=0, shuffle=False, eos_id=EOS, vocab_size=32, prefetch=0
    )


@pytest.fixture(scope="module")
def model() -> nnx.Module:
    return Transformer(MODEL, rngs=nnx.Rngs(0))


# Compiled, as the train step is: run op by op instead, every operation of the model
# compiles on its own for each new shape (a minute for this file on a loaded 2-core CPU).


@nnx.jit
def batch_loss_sums(model: nnx.Module, batch: dict, ids: jax.Array, weights: jax.Array) -> dict:
    return loss_sums(forward(model, batch), ids, weights, 0.0)


@nnx.jit
def loss_and_grads(model: nnx.Module, batch: dict) -> tuple[jax.Array, nnx.State]:
    graphdef, params = nnx.split(model)

    def mean_loss(p: nnx.State) -> jax.Array:
        sums = loss_sums(forward(nnx.merge(graphdef, p), batch), *targets(batch), 0.0)
        return sums["ce"] / sums["weight"]

    return jax.value_and_grad(mean_loss)(params)


def targets(batch: dict) -> tuple[jax.Array, jax.Array]:
    return batch["targets"], batch["weights"]


def test_prompt_targets_have_no_effect_on_the_loss_or_the_gradients(model):
    data = packed_docs(documents())
    batch = {k: jnp.asarray(v) for k, v in data.batch(0, 3, SEQ).items()}
    prompt = (batch["weights"] == 0) & (batch["segment_ids"] > 0)
    assert int(prompt.sum()) >= 10  # prompt targets inside documents, not just padding
    changed = jnp.where(prompt, (batch["targets"] + 5) % MODEL.vocab_size, batch["targets"])
    loss, grads = loss_and_grads(model, batch)
    loss2, grads2 = loss_and_grads(model, {**batch, "targets": changed})
    # weight 0 multiplies those targets' terms: exactly nothing, in the same order
    assert float(loss) == float(loss2)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_array_equal(a, b)
    # ... while a completion target does move them (the test can tell)
    first = np.unravel_index(int(jnp.argmax(batch["weights"] > 0)), batch["weights"].shape)
    moved = batch["targets"].at[first].set((batch["targets"][first] + 5) % MODEL.vocab_size)
    assert float(loss_and_grads(model, {**batch, "targets": moved})[0]) != float(loss)


def test_packed_loss_equals_the_token_weighted_mean_of_each_document_alone(model):
    docs = documents(1)
    data = packed_docs(docs)
    rows = data.train.rows
    assert rows < len(docs)  # several documents share rows
    batch = {k: jnp.asarray(v) for k, v in data.batch(0, rows, SEQ).items()}
    sums = batch_loss_sums(model, batch, *targets(batch))
    ce, weight = 0.0, 0.0
    for i in range(len(docs)):  # each document alone: one row of its own length, no mask
        a, b = int(docs.starts[i]), int(docs.starts[i + 1])
        alone = {"inputs": jnp.asarray(docs.tokens[None, a : b - 1])}
        w = jnp.asarray(docs.loss[None, a + 1 : b], jnp.float32)
        one = batch_loss_sums(model, alone, jnp.asarray(docs.tokens[None, a + 1 : b]), w)
        ce, weight = ce + float(one["ce"]), weight + float(one["weight"])
    assert float(sums["weight"]) == weight
    # Each target's cross-entropy is a logsumexp over the vocabulary of logits, each made
    # through attention over <= SEQ keys; packed and alone, these sums run in other orders
    # (other lengths): rounding_tolerance over vocab * SEQ terms, relative to the loss (a
    # mean of positive terms, so its magnitude is the terms' scale).
    tol = rounding_tolerance(MODEL.vocab_size * SEQ)
    packed_loss, alone_loss = float(sums["ce"]) / float(sums["weight"]), ce / weight
    np.testing.assert_allclose(packed_loss, alone_loss, rtol=tol)
    # without the mask the documents see each other: the losses differ by far more
    unmasked = {k: batch[k] for k in BATCH_DTYPES}
    leaky = batch_loss_sums(model, unmasked, *targets(batch))
    assert abs(float(leaky["ce"]) / weight - alone_loss) > 10 * tol * alone_loss


def test_grad_accum_with_segments_equals_no_accumulation(model):
    graphdef, params = nnx.split(model)
    data = packed_docs(documents(2))
    batch = {k: jnp.asarray(v) for k, v in data.batch(0, 4, SEQ).items()}
    # keep the gradients the optimizer is given (as in test_grad_accum)
    keep = optax.GradientTransformation(
        init=lambda p: jax.tree.map(jnp.zeros_like, p),
        update=lambda g, state, params=None: (g, g),
    )
    tx, schedule = optax.chain(keep, optax.sgd(0.5)), optax.constant_schedule(0.5)
    grads = {}
    for accum, b in [(1, batch), (2, batch), ("no mask", {k: batch[k] for k in BATCH_DTYPES})]:
        state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
        n = 1 if accum == "no mask" else accum
        step = jax.jit(make_train_step(graphdef, tx, schedule, z_loss=0.0, grad_accum=n))
        new, metrics = step(state, b)
        grads[accum] = (new.opt_state[0], float(metrics["total_weights"]))
    assert grads[1][1] == grads[2][1] == float(batch["weights"].sum())
    # a gradient entry sums SEQ * 4 places through contractions <= vocab (as test_grad_accum)
    assert_equal_to_rounding(grads[2][0], grads[1][0], terms=4 * SEQ * MODEL.vocab_size)
    # the segments reach the step: without them the gradients differ
    with pytest.raises(AssertionError):
        assert_equal_to_rounding(grads["no mask"][0], grads[1][0], terms=4 * SEQ * MODEL.vocab_size)
