"""A training step reads the embedding table by rows only, and its row gradient is the bag's gradient (TensorFlow).

Once LazyAdam has updated rows of the table in place, TensorFlow keeps the variable in copy-on-read mode: every whole
read of it (ReadVariableOp) copies the table. On the default model that is ~400 MB per step, and JD epochs took 1.7×
as long. The step must therefore gather the table's rows (ResourceGather) and write them back (ResourceScatter*).
"""

from __future__ import annotations

import numpy as np
import pytest


def _table_uses_in_a_train_step(training: bool) -> tuple[set[str], float]:
    import tensorflow as tf

    from training.model import LazyAdam, WeightedBag

    bag = WeightedBag(1024, 8, seed=1, init_scale=0.1)
    bag.build(None)
    optimizer = LazyAdam(0.01, sparse_lr_multiplier=2.0)
    optimizer.build(bag.trainable_variables)
    rng = np.random.default_rng(0)
    ids = tf.constant(rng.integers(1, 1024, (16, 6)), dtype=tf.int64)
    weights = tf.constant(rng.random((16, 6)), dtype=tf.float32)

    @tf.function
    def step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(bag(ids, weights, training=training) - 1.0))
        grads = tape.gradient(loss, bag.trainable_variables)
        optimizer.apply(grads, bag.trainable_variables)
        return loss

    before = np.array(bag.embeddings.numpy())
    concrete = step.get_concrete_function()
    step()
    changed = float(np.abs(bag.embeddings.numpy() - before).max())
    handle = bag.embeddings.value.handle
    inside = [internal for external, internal in concrete.graph.captures if external is handle]
    assert len(inside) == 1, "the table's handle is not captured by the traced step"
    uses = {consumer.type for consumer in inside[0].consumers()}
    # one level down through identities the tracer may add
    for consumer in inside[0].consumers():
        if consumer.type == "Identity":
            uses |= {c.type for out in consumer.outputs for c in out.consumers()}
    return uses, changed


@pytest.mark.parametrize("training", [True, False])
def test_a_training_step_gathers_and_scatters_the_table_rows_and_never_reads_it_whole(training: bool) -> None:
    uses, changed = _table_uses_in_a_train_step(training)
    assert changed > 0  # the step did train the table
    assert "ReadVariableOp" not in uses, uses
    assert "ResourceGather" in uses and any(u.startswith("ResourceScatter") for u in uses), uses


def _one_step(training: bool, dense_limit: int, monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, np.ndarray]:
    """One LazyAdam step of a bag on ids repeated within and across products (padding 0 at weight 0): the table
    after it, and the table's gradient as a dense array."""
    import tensorflow as tf

    import training.model as model
    from training.model import LazyAdam, WeightedBag

    monkeypatch.setattr(model, "ROW_GRADIENT_DENSE_LIMIT", dense_limit)
    bag = WeightedBag(64, 5, seed=3, init_scale=0.5)
    bag.build(None)
    optimizer = LazyAdam(0.05, sparse_lr_multiplier=3.0)
    optimizer.build(bag.trainable_variables)
    rng = np.random.default_rng(7)
    ids = rng.integers(1, 12, (9, 7))  # 11 rows for 63 tokens: every row repeats
    ids[:, -2:] = 0
    ids[0, :3] = 5  # one row three times in one product
    weights = rng.random((9, 7)).astype(np.float32)
    weights[:, -2:] = 0.0
    target = tf.constant(rng.normal(size=(9, 5)), dtype=tf.float32)

    @tf.function
    def step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(bag(tf.constant(ids), tf.constant(weights), training=training) - target))
        grads = tape.gradient(loss, bag.trainable_variables)
        optimizer.apply(grads, bag.trainable_variables)
        return grads[0]

    grad = step()
    return bag.embeddings.numpy(), tf.convert_to_tensor(grad).numpy()


@pytest.mark.parametrize("dense_limit", [1 << 24, 0], ids=["rows-by-products", "per-token"])
def test_the_training_gradient_and_step_are_those_of_the_bag(dense_limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
    table, grad = _one_step(True, dense_limit, monkeypatch)
    reference_table, reference_grad = _one_step(False, dense_limit, monkeypatch)
    assert np.abs(grad).max() > 0.1
    np.testing.assert_allclose(grad, reference_grad, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(table, reference_table, rtol=1e-6, atol=1e-6)
    assert np.abs(table[1:12] - table[1:12].mean()).max() > 0  # rows moved, differently


@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_lazy_adam_moves_only_the_batch_rows_and_by_adams_rule(decay: float) -> None:
    """Three sparse steps (one with a row twice) against Adam written out in numpy: the rows of each step move by
    Adam's bias-corrected rule on their own moments; the other rows and their moments stay as they were."""
    import keras
    import tensorflow as tf

    from training.model import LazyAdam

    rng = np.random.default_rng(5)
    start = rng.normal(size=(10, 4)).astype(np.float32)
    table = keras.Variable(start)
    lr, multiplier, b1, b2, eps = 0.05, 2.0, 0.9, 0.999, 1e-7
    optimizer = LazyAdam(lr, sparse_lr_multiplier=multiplier, sparse_weight_decay=decay, epsilon=eps)
    optimizer.build([table])
    steps = [np.array([1, 3, 3, 7]), np.array([3, 8]), np.array([1, 2, 8, 9])]

    @tf.function
    def apply(values: tf.Tensor, indices: tf.Tensor) -> None:
        optimizer.apply([tf.IndexedSlices(values, indices, tf.constant([10, 4]))], [table])

    w, m, v = start.astype(np.float64), np.zeros((10, 4)), np.zeros((10, 4))
    for t, indices in enumerate(steps, start=1):
        values = rng.normal(size=(len(indices), 4)).astype(np.float32)
        apply(tf.constant(values), tf.constant(indices))
        g = np.zeros((10, 4))
        np.add.at(g, indices, values)
        touched = np.unique(indices)
        m[touched] = b1 * m[touched] + (1 - b1) * g[touched]
        v[touched] = b2 * v[touched] + (1 - b2) * g[touched] ** 2
        alpha = lr * multiplier * np.sqrt(1 - b2**t) / (1 - b1**t)
        w[touched] -= alpha * m[touched] / (np.sqrt(v[touched]) + eps) + lr * multiplier * decay * w[touched]
        np.testing.assert_allclose(table.numpy(), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(optimizer._momentums[0].numpy(), m, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(optimizer._velocities[0].numpy(), v, rtol=1e-4, atol=1e-9)
    np.testing.assert_array_equal(table.numpy()[[0, 4, 5, 6]], start[[0, 4, 5, 6]])  # never in a batch
