"""Packing, shuffling, held-out batches, per-process rows and resumable state."""

import logging

import numpy as np
import pytest

from nnxtrain.data import PackedData, TokenStream, process_rows
from nnxtrain.data.shuffle import IndexShuffle
from nnxtrain.errors import ConfigError, UserError

EOS = 0


def packed(n_train: int = 1000, n_val: int = 300, seed: int = 0, **kw) -> PackedData:
    """A dataset whose token at stream position p is 1 + p % 250 (so positions are
    recoverable), split over two arrays to exercise reads across files."""
    tokens = (1 + np.arange(n_train + n_val) % 250).astype(np.uint16)
    cut = n_train // 3
    stream = TokenStream([tokens[:cut], tokens[cut:]], ["a.bin", "b.bin"])
    train, val = stream.split(n_train)
    kw = {"prefetch": 0, **kw}
    return PackedData(
        train, val, kind="test", seed=seed, eos_id=EOS, vocab_size=256, id_limit=256, **kw
    )


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 64, 1000, 4097])
def test_index_shuffle_is_a_permutation_that_changes_with_epoch_and_seed(n):
    perm = IndexShuffle(n, seed=3)
    orders = [perm(np.arange(n), e) for e in range(3)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(n))
    if n >= 17:
        assert not np.array_equal(orders[0], orders[1])
        assert not np.array_equal(orders[0], IndexShuffle(n, seed=4)(np.arange(n), 0))
        assert not np.array_equal(orders[0], np.arange(n))
    one = perm(np.array([n - 1]), 2)  # any single index, alone
    assert one[0] == orders[2][n - 1]


def test_windows_overlap_by_one_and_cover_every_target_once_per_epoch():
    data = packed(n_train=1000, shuffle=True)
    seq, batch = 16, 4
    n = PackedData.num_windows(1000, seq)  # ceil(999 / 16) = 63, the last one padded
    assert n == 63
    seen = []
    for step in range(-(-n // batch)):
        b = data.batch(step, batch, seq)
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        w = b["weights"].astype(bool)
        seen.extend(b["targets"][w].tolist())
    # One epoch = n windows; the steps above read n + 1 (the extra one starts epoch 2).
    first_epoch = sorted(seen[: 1000 - 1])
    assert sorted(first_epoch) == sorted((1 + np.arange(1, 1000) % 250).tolist())


def test_last_window_is_padded_with_eos_and_masked():
    data = packed(n_train=1000, shuffle=False)
    b = data.batch(62, 1, 16)  # window 62 covers positions 992..999 and then padding
    assert b["weights"][0].tolist() == [1.0] * 7 + [0.0] * 9
    assert b["inputs"][0, 8:].tolist() == [EOS] * 8
    assert b["targets"][0, :7].tolist() == (1 + np.arange(993, 1000) % 250).tolist()


def test_batches_are_a_pure_function_of_seed_and_step():
    a, b, other = packed(seed=1), packed(seed=1), packed(seed=2)
    for step in (0, 3, 40):
        x, y = a.batch(step, 8, 16), b.batch(step, 8, 16)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(a.batch(0, 8, 16)["inputs"], other.batch(0, 8, 16)["inputs"])


def test_rows_are_exactly_those_rows_of_the_global_batch():
    data = packed()
    full = data.batch(5, 8, 16)
    for rows in (np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7]), np.array([1, 6])):
        part = data.batch(5, 8, 16, rows=rows)
        for k in full:
            np.testing.assert_array_equal(part[k], full[k][rows])
    ev = data.batch(1, 8, 16, "eval")
    np.testing.assert_array_equal(
        data.batch(1, 8, 16, "eval", rows=rows)["inputs"], ev["inputs"][rows]
    )


def test_prefetch_gives_the_same_batches_as_none():
    ahead, plain = packed(prefetch=3), packed(prefetch=0)
    try:
        for step in [0, 1, 2, 3, 7, 8, 2]:  # a jump and a step back drop stale prefetches
            x, y = ahead.batch(step, 8, 16), plain.batch(step, 8, 16)
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])
    finally:
        ahead.close()


def test_eval_covers_the_held_out_split_in_order_once():
    data = packed(n_train=1000, n_val=300)
    seq, batch = 16, 8
    n_val = PackedData.num_windows(300, seq)  # 19: fewer than 3 batches of 8
    targets = []
    for i in range(4):
        b = data.batch(i, batch, seq, split="eval")
        targets.extend(b["targets"][b["weights"].astype(bool)].tolist())
        if i == 3:
            assert b["weights"].sum() == 0  # past the end: all padding
    assert n_val == 19
    assert targets == (1 + np.arange(1001, 1300) % 250).tolist()


def test_split_too_small_for_one_batch_or_sequence_is_a_config_error():
    data = packed(n_train=1000, n_val=50)
    with pytest.raises(ConfigError, match="fewer than one batch") as e:
        data.check(batch_size=8, seq_len=16, evaluate=True)
    assert e.value.key == "data.val_fraction"
    data.check(batch_size=8, seq_len=16, evaluate=False)  # no evaluation: no need
    with pytest.raises(ConfigError, match="fewer than one sequence") as e:
        packed(n_train=16).check(batch_size=1, seq_len=16, evaluate=False)
    assert e.value.key == "data.path"


def test_eval_batches_without_a_held_out_split_are_a_config_error():
    data = packed(n_train=1000, n_val=0)
    data.val = None
    with pytest.raises(ConfigError, match="held-out split has 0 tokens") as e:
        data.batch(0, batch_size=2, seq_len=16, split="eval")
    assert e.value.key == "data.val_fraction"


def test_token_ids_outside_the_vocabulary_are_a_user_error():
    tokens = np.array([1, 2, 3, 300, 4, 5, 6, 7, 8, 9], np.uint16)
    data = PackedData(
        TokenStream([tokens], ["big.bin"]), None, kind="tokens", seed=0, eos_id=0,
        vocab_size=None, id_limit=256, prefetch=0,
    )  # fmt: skip
    with pytest.raises(UserError, match=r"token id 300 .*big\.bin"):
        data.batch(0, 2, 4)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (-3, r"token id -3 is negative .*ids\.npy"),
        # An int64 id that int32 would wrap around to 4 (a valid id) if it were cast first.
        (2**32 + 4, rf"token id {2**32 + 4} is not below .*ids\.npy"),
    ],
)
def test_token_ids_are_checked_before_they_are_narrowed(bad, match):
    tokens = np.array([1, 2, 3, bad, 4, 5, 6, 7, 8, 9], np.int64)  # as a .npy may hold them
    data = PackedData(
        TokenStream([tokens], ["ids.npy"]), None, kind="tokens", seed=0, eos_id=0,
        vocab_size=None, id_limit=256, prefetch=0, shuffle=False,
    )  # fmt: skip
    with pytest.raises(UserError, match=match):
        data.batch(0, 2, 4)


def test_batches_are_int32_ids():
    batch = packed().batch(0, batch_size=2, seq_len=16)
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32


def test_resume_from_state_dict_continues_the_exact_batch_order(caplog):
    steps, batch, seq = 12, 4, 16
    uninterrupted = packed(seed=5, prefetch=2)
    reference = [uninterrupted.batch(s, batch, seq) for s in range(steps)]
    uninterrupted.close()

    first = packed(seed=5, prefetch=2)
    for s in range(5):
        first.batch(s, batch, seq)
    state = first.state_dict()
    first.close()
    assert state["next_step"] == 5

    resumed = packed(seed=5, prefetch=2)  # a new process: a fresh object
    caplog.set_level(logging.WARNING, "nnxtrain.data")
    resumed.load_state_dict(state)
    assert not caplog.records  # same data: no warning
    assert resumed.next_step == 5
    after = [resumed.next_batch(batch, seq) for _ in range(5, steps)]
    resumed.close()
    for want, got in zip(reference[5:], after, strict=True):
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    # across an epoch boundary too (63 windows, 4 per step: epoch 2 starts at step 15)
    np.testing.assert_array_equal(
        packed(seed=5).batch(16, batch, seq)["inputs"], resumed.batch(16, batch, seq)["inputs"]
    )


def test_loading_state_of_different_data_warns(caplog):
    caplog.set_level(logging.WARNING, "nnxtrain.data")
    state = packed(n_train=1000).state_dict()
    packed(n_train=900).load_state_dict(state)
    assert "differs from the checkpoint" in caplog.text and "train_tokens" in caplog.text
    caplog.clear()
    packed(seed=9).load_state_dict(state)
    assert "seed 0 -> 9" in caplog.text


class _FakeSharding:
    """Stands in for a multi-process batch sharding: this process holds some row blocks."""

    def __init__(self, blocks):
        self.blocks = blocks

    def addressable_devices_indices_map(self, shape):
        return {i: (slice(a, b), slice(None)) for i, (a, b) in enumerate(self.blocks)}


def test_process_rows_are_the_rows_of_this_process_devices():
    assert process_rows(_FakeSharding([(0, 4), (4, 8)]), 8) is None  # all rows: None
    rows = process_rows(_FakeSharding([(12, 16), (4, 8), (4, 8)]), 16)  # replicas repeat
    assert rows is not None and rows.tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
