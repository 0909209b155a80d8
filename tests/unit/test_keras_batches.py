"""The fits' tf.data input pipelines (training.batches)."""

from __future__ import annotations

import numpy as np
import pytest

from tagstream.errors import DataError
from training.batches import keras_batches


def _data(n: int = 50) -> tuple[dict[str, np.ndarray], np.ndarray]:
    ids = np.arange(n, dtype=np.int64).reshape(n, 1) * np.ones((1, 3), dtype=np.int64)
    inputs = {"ids": ids, "weights": ids.astype(np.float32) / 10, "numeric": np.zeros((n, 2), np.float32)}
    targets = np.zeros((n, 4), np.float32)
    targets[np.arange(n), np.arange(n) % 4] = 1.0
    return inputs, targets


def _passes(ds, count: int) -> list[list[int]]:
    """The row ids of `count` passes over the dataset, checking each batch's rows against their targets."""
    out = []
    for _ in range(count):
        rows: list[int] = []
        for x, ys in ds:
            ids = x["ids"].numpy()[:, 0]
            assert len(ys) == 2
            for y in ys:
                assert (y.numpy().argmax(axis=1) == ids % 4).all()  # each row keeps its own target
            np.testing.assert_allclose(x["weights"].numpy()[:, 0], ids / 10, rtol=1e-6)
            rows.extend(int(i) for i in ids)
        out.append(rows)
    return out


def test_a_shuffled_pass_yields_every_row_once_in_a_new_seeded_order_each_time() -> None:
    inputs, targets = _data()
    ds = keras_batches(inputs, targets, n_outputs=2, batch_size=16, shuffle=True, seed=7)
    first, second = _passes(ds, 2)
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second  # a new order at every epoch
    assert first != list(range(50))
    again = _passes(keras_batches(inputs, targets, n_outputs=2, batch_size=16, shuffle=True, seed=7), 2)
    assert again == [first, second]  # the same orders on every run with the same seed
    other = _passes(keras_batches(inputs, targets, n_outputs=2, batch_size=16, shuffle=True, seed=8), 1)
    assert other[0] != first


def test_an_unshuffled_pass_keeps_the_row_order_and_a_short_last_batch() -> None:
    inputs, targets = _data()
    ds = keras_batches(inputs, targets, n_outputs=2, batch_size=16, shuffle=False, seed=7)
    assert [len(ys[0]) for _, ys in ds] == [16, 16, 16, 2]
    assert _passes(ds, 2) == [list(range(50))] * 2


def test_tf_data_autotuning_is_off() -> None:
    # deleting an autotuned iterator waited seconds for tf.data's autotuning thread (up to ~10 s per epoch on JD)
    inputs, targets = _data()
    ds = keras_batches(inputs, targets, n_outputs=1, batch_size=16, shuffle=True, seed=1)
    assert ds.options().autotune.enabled is False


def test_inputs_and_targets_of_different_lengths_are_refused() -> None:
    inputs, targets = _data()
    with pytest.raises(DataError, match="same non-zero number of rows"):
        keras_batches(inputs, targets[:-1], n_outputs=1, batch_size=16, shuffle=True, seed=1)
    with pytest.raises(DataError, match="same non-zero number of rows"):
        keras_batches(
            {k: v[:0] for k, v in inputs.items()}, targets[:0], n_outputs=1, batch_size=16, shuffle=False, seed=1
        )
