"""Packing whole documents into rows: segment ids, positions, weights, purity in (seed, step)."""

import itertools

import numpy as np
import pytest

from nnxtrain.data.documents import DocumentData, Documents, Packed, pack

EOS = 0


def documents(lengths, seed: int = 0) -> Documents:
    """Documents of the given token counts; token t of document d is 1 + (7*d + t) % 250,
    and every other token counts for the loss (so weights are checkable)."""
    rng = np.random.default_rng(seed)
    ids = [1 + (7 * d + np.arange(n)) % 250 for d, n in enumerate(lengths)]
    loss = [rng.random(n) < 0.5 for n in lengths]
    return Documents.build(ids, loss)


def data(lengths, seq_len: int = 32, val=None, **kw) -> DocumentData:
    kw = {"seed": 0, "eos_id": EOS, "vocab_size": 256, "prefetch": 0, **kw}
    val_docs = documents(val, seed=1) if val else None
    return DocumentData(documents(lengths), val_docs, seq_len=seq_len, **kw)


@pytest.mark.parametrize("seed", range(5))
def test_pack_puts_every_document_whole_in_one_row_that_it_fits(seed):
    rng = np.random.default_rng(seed)
    places = rng.integers(1, 33, size=300)
    order, row_starts = pack(places, 32)
    assert sorted(order.tolist()) == list(range(300))  # each document exactly once
    fill = np.array([places[order[a:b]].sum() for a, b in itertools.pairwise(row_starts)])
    assert (fill > 0).all() and (fill <= 32).all()
    # a new row is opened only when no row fits: so at most one row is half empty or more
    assert (fill <= 16).sum() <= 1


def test_batches_keep_documents_whole_with_restarting_positions(tmp_path):
    lengths = [2, 5, 33, 17, 9, 9, 3, 30, 12, 4, 20, 6, 2, 11]
    d = data(lengths, shuffle=False)
    docs = d.train.docs
    seen = []
    for step in range(d.train.rows):
        b = d.batch(step, 1, 32)
        seg, pos = b["segment_ids"][0], b["positions"][0]
        n = int((seg > 0).sum())
        assert (seg[:n] > 0).all() and (seg[n:] == 0).all()  # padding only at the end
        assert (np.diff(seg[:n]) >= 0).all() and seg[0] == 1  # 1, 1, ..., 2, 2, ...
        assert (b["weights"][0][n:] == 0).all() and (pos[n:] == 0).all()
        for k in range(1, int(seg.max()) + 1):
            at = seg == k
            assert pos[at].tolist() == list(range(at.sum()))  # restarts at 0
            inputs, targets = b["inputs"][0][at], b["targets"][0][at]
            i = int(inputs[0] - 1) // 7  # which document: each starts with its own token
            a, z = docs.starts[i], docs.starts[i + 1]
            assert inputs.tolist() == docs.tokens[a : z - 1].tolist()
            assert targets.tolist() == docs.tokens[a + 1 : z].tolist()  # never another doc's
            assert b["weights"][0][at].tolist() == docs.loss[a + 1 : z].astype(float).tolist()
            seen.append(i)
    assert sorted(seen) == list(range(len(lengths)))  # one epoch: every document once


def test_a_batch_is_a_pure_function_of_seed_and_step():
    lengths = np.random.default_rng(3).integers(2, 30, size=200).tolist()
    a, b = data(lengths), data(lengths, prefetch=2)
    for step in [0, 5, 1, 7, 40]:  # out of order, and past the first epoch
        one, two = a.batch(step, 4, 32), b.batch(step, 4, 32)
        assert all(np.array_equal(one[k], two[k]) for k in one)
        part = a.batch(step, 4, 32, rows=np.array([1, 3]))
        assert all(np.array_equal(part[k], one[k][[1, 3]]) for k in one)
    b.close()
    other = data(lengths, seed=1).batch(0, 4, 32)
    assert not np.array_equal(other["inputs"], a.batch(0, 4, 32)["inputs"])


def test_eval_batches_read_held_out_rows_in_order_then_padding():
    d = data([10, 10, 10], seq_len=16, val=[16, 16, 5])
    assert d.val.rows == 3
    b = d.batch(0, 2, 16, split="eval")
    assert (b["segment_ids"][0][:15] == 1).all() and b["weights"][0].sum() > 0
    last = d.batch(1, 2, 16, split="eval")
    assert last["segment_ids"][0].any() and not last["segment_ids"][1].any()  # past the end
    assert last["weights"][1].sum() == 0


def test_packing_efficiency_is_the_non_padding_share():
    p = Packed.of(documents([17, 17, 9]), 16)  # 16, 16 and 8 places
    assert p.rows == 3 and p.efficiency == pytest.approx(40 / 48)


def test_resume_state_and_fingerprint_notice_changed_documents(caplog):
    d = data([5, 6, 7, 8])
    d.batch(0, 2, 32)
    state = d.state_dict()
    assert state["next_step"] == 1
    other = data([5, 6, 7, 9])
    other.load_state_dict(state)
    assert other.next_step == 1 and "differs from the checkpoint" in caplog.text
