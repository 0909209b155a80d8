"""A training step reads the embedding table by rows only (TensorFlow).

Once LazyAdam has updated rows of the table in place, TensorFlow keeps the variable in copy-on-read mode: every whole
read of it (ReadVariableOp) copies the table. On the default model that is ~400 MB per step, and JD epochs took 1.7×
as long. The step must therefore gather the table's rows (ResourceGather) and write them back (ResourceScatter*).
"""

from __future__ import annotations

import numpy as np


def _table_uses_in_a_train_step() -> tuple[set[str], float]:
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
            loss = tf.reduce_sum(tf.square(bag(ids, weights) - 1.0))
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


def test_a_training_step_gathers_and_scatters_the_table_rows_and_never_reads_it_whole() -> None:
    uses, changed = _table_uses_in_a_train_step()
    assert changed > 0  # the step did train the table
    assert "ReadVariableOp" not in uses, uses
    assert "ResourceGather" in uses and any(u.startswith("ResourceScatter") for u in uses), uses
