"""The Keras fits' input pipelines (tf.data, imports TensorFlow: training only).

Keras builds its own tf.data pipeline from numpy arrays, with tf.data's autotuning on. Deleting an autotuned iterator
can wait seconds for one of tf.data's background threads: measured on the JD training set, one epoch's iterator in
three or so took 7–10 s to delete, with the process idle (py-spy: `UnboundedThreadPool::LogicalThreadWrapper::
~LogicalThreadWrapper` under `IteratorResource::~IteratorResource`); never with autotuning off. A fit deletes one
iterator per epoch for the training data and one for the validation data, so a JD training lost up to a minute and
its epoch times looked twice as noisy as they were. These pipelines do the same work with autotuning off.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tagstream.errors import DataError

__all__ = ["keras_batches"]


def keras_batches(
    inputs: dict[str, np.ndarray],
    targets: np.ndarray,
    *,
    n_outputs: int,
    batch_size: int,
    shuffle: bool,
    seed: int,
) -> Any:
    """A `tf.data.Dataset` of `(inputs, (targets,) * n_outputs)` batches for `keras.Model.fit`: every row once per
    pass, in a new seeded order at each pass when `shuffle` (the same orders on every run with the same seed), in
    order otherwise; the last batch may be short. tf.data autotuning is off (see the module docstring)."""
    import tensorflow as tf

    n = len(targets)
    if n == 0 or any(len(v) != n for v in inputs.values()):
        raise DataError(f"inputs and targets need the same non-zero number of rows, got {n} targets")
    columns = {name: tf.constant(values) for name, values in inputs.items()}
    target = tf.constant(targets)
    rows = tf.data.Dataset.range(n)
    if shuffle:
        rows = rows.shuffle(n, seed=seed, reshuffle_each_iteration=True)

    def take(index: Any) -> tuple[dict[str, Any], tuple[Any, ...]]:
        y = tf.gather(target, index)
        return {name: tf.gather(column, index) for name, column in columns.items()}, (y,) * n_outputs

    options = tf.data.Options()
    options.autotune.enabled = False
    options.deterministic = True
    return rows.batch(batch_size).map(take).prefetch(2).with_options(options)
