"""The Keras multi-label tagger on featurizer output (imports TensorFlow/Keras: training only).

Graph (per ensemble member, members averaged in probability space inside one graph):

    ids [N,L] ─┐
               ├─ WeightedBag: Σ_l E[ids_l] · weights_l   (= a sparse linear layer on the TF-IDF vector) + bias, ReLU
    weights ───┘
    numeric [N,K] ─ concat ─ Dense+ReLU (+dropout, L2) … ─ one head per group ─┐
                                                                               ├─ logits [N,T] (training)
    hierarchical: the category_l2 head also sees the category_l1 softmax,      │
    the leaf head sees the l2 softmax (conditioned heads)                      └─ scores [N,T] (softmax per
                                                                                   exclusive group, sigmoid per
                                                                                   multi group; export/serving)

Linear member (`linear_dim` > 0, default 128): member 0's bag table gets `linear_dim` extra columns; those columns
(no ReLU, no hidden layer) feed flat heads = a low-rank linear softmax model with its own loss. Its logits are added
to the deep member's (`combine="logits"`, product of experts) or the probabilities averaged (`"probs"`). Measured on
JD (stratified 70/10/20 and merchant-held-out splits, leaf weighted F1): deep only 0.831 / 0.795 → + linear 128
0.840 / 0.802 at about the same training time (one gather/update serves both column blocks). Tried there without a
win and removed: EMA/SWA weight averaging, a larger Adam epsilon or decay of all rows for the embedding table, the
linear heads on the deep member's own bag, a separate linear table (slower).

Loss: per exclusive group softmax cross-entropy with label smoothing and tempered class weights, only on products
labelled in that group; per multi group binary cross-entropy.

Optimiser: `LazyAdam` — Adam whose embedding-table updates touch only the rows of the batch, with a larger learning
rate for those rows (`sparse_lr_multiplier`): a rare hashed feature is seen in a few batches per epoch and with
plain (dense) Adam it both drifts on stale momentum and learns too little (measured on JD: leaf w-F1 0.815 dense
Adam → 0.827 lazy ×4). Embedding rows start near zero (`embed_init_scale`) so unseen/rare features add no noise.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from training.labels import CATEGORY_GROUPS, LabelMap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
from keras import layers, ops

__all__ = [
    "LazyAdam",
    "ModelConfig",
    "TaggerModels",
    "build_models",
    "class_weights",
    "make_loss",
    "round_embeddings",
]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture and optimisation hyper-parameters."""

    embed_dim: int = 256
    embed_init_scale: float = 1e-3
    sparse_lr_multiplier: float = 1.0
    sparse_weight_decay: float = 0.0
    hidden: tuple[int, ...] = (512,)
    dropout: float = 0.25
    input_dropout: float = 0.0
    l2: float = 0.0
    label_smoothing: float = 0.05
    class_weight_power: float = 0.3
    ensemble: int = 1
    linear_dim: int = 0
    combine: str = "logits"
    hierarchical: bool = True
    learning_rate: float = 2e-3
    seed: int = 42
    group_weights: dict[str, float] = field(default_factory=dict)


def _resource(variable):
    """The TensorFlow resource variable behind a Keras variable; a TensorFlow variable or tensor as it is (a
    `tf.Variable`'s own `value` is a method)."""
    import tensorflow as tf

    return variable if isinstance(variable, tf.Variable) else getattr(variable, "value", variable)


def _take_rows(table, ids):
    """table[ids] along axis 0. On TensorFlow a plain `tf.gather`: `ops.take` first maps negative ids to the end of
    the table, which tf2onnx exports as 9 more nodes in front of the Gather (ONNX's Gather already does that, and
    the featurizer's ids are never negative)."""
    if keras.backend.backend() != "tensorflow":
        return ops.take(table, ids, axis=0)
    import tensorflow as tf

    # from the resource variable itself (ResourceGather): a whole read (ReadVariableOp) copies the table at every
    # step once LazyAdam's row updates have put the variable in copy-on-read mode (~400 MB; JD epochs 1.7x slower)
    return tf.gather(_resource(table), ids, axis=0)


# the dense [U, N] matrix of the row gradient is used up to this many entries (64 MB); larger batches sum [N·L, D]
ROW_GRADIENT_DENSE_LIMIT = 1 << 24


def _bag_with_row_gradient(table, ids, weights):
    """The bag's sums (as `WeightedBag` computes them) with the table's gradient computed per distinct row.

    Autodiff of gather + batched MatMul writes an [N·L, D] gradient (one row per token: ~50 MB per JD step) that
    `LazyAdam` then sums per distinct row. Here the step gathers each distinct row of the table once ([U, D]), and
    the gradient of distinct row u, Σ_{n,l: ids[n,l]=u} weights[n,l] · d_out[n], is S[U, N] @ d_out[N, D] with S the
    summed weights of each row in each product: the table's gradient is an `IndexedSlices` with distinct indices
    (LazyAdam then skips its own sum). Same gradient (up to float summation order); measured on JD
    (`bench/RESULTS.md`): fit + refit 154 s against 180 s (median of three runs, against one run of the plain bag
    alternated with them). The weights get no gradient (they are inputs).
    """
    import tensorflow as tf

    rows, pos = tf.unique(tf.reshape(ids, [-1]))
    # ResourceGather of the distinct rows: autodiff gives the table an IndexedSlices of the rows' gradient; a
    # tf.custom_gradient reading the variable itself would read it whole (IdentityN over a ReadVariableOp: a copy)
    distinct = tf.gather(_resource(table), rows)  # [U, D]
    n, length = tf.shape(ids)[0], tf.shape(ids)[1]
    n_rows = tf.shape(rows)[0]
    pos = tf.reshape(pos, tf.stack([n, length]))

    @tf.custom_gradient
    def bag(distinct_rows, w):
        vec = tf.gather(distinct_rows, pos)  # [N, L, D]
        sums = tf.squeeze(tf.matmul(tf.expand_dims(w, 1), vec), axis=1)

        def grad(d_out):
            flat_w = tf.reshape(w, [-1])
            flat_pos = tf.reshape(pos, [-1])

            def dense() -> tf.Tensor:
                product = tf.repeat(tf.range(n), length)
                s = tf.math.unsorted_segment_sum(flat_w, flat_pos * n + product, n_rows * n)
                return tf.matmul(tf.reshape(s, tf.stack([n_rows, n])), d_out)

            def per_token() -> tf.Tensor:
                tokens = tf.reshape(w[:, :, None] * d_out[:, None, :], [-1, tf.shape(d_out)[1]])
                return tf.math.unsorted_segment_sum(tokens, flat_pos, n_rows)

            small = tf.cast(n_rows, tf.int64) * tf.cast(n, tf.int64) <= ROW_GRADIENT_DENSE_LIMIT
            return tf.cond(small, dense, per_token), None

        return sums, grad

    return bag(distinct, weights)


@keras.saving.register_keras_serializable(package="tagstream")
class WeightedBag(layers.Layer):
    """Σ_l E[ids[:, l]] · weights[:, l] over hash-bucket embeddings E (row 0 = padding, weight 0)."""

    def __init__(self, n_buckets: int, dim: int, seed: int | None = None, init_scale: float = 1e-3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n_buckets = n_buckets
        self.dim = dim
        self.seed = seed
        self.init_scale = init_scale

    def build(self, input_shape) -> None:
        # small init: a rare feature's row gets few updates, so random init would stay as noise in its vector
        scale = self.init_scale
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.n_buckets, self.dim),
            initializer=keras.initializers.RandomUniform(-scale, scale, seed=self.seed),
        )
        self.bias = self.add_weight(name="bias", shape=(self.dim,), initializer="zeros")

    def call(self, ids, weights, training=None):
        if training and keras.backend.backend() == "tensorflow":
            return _bag_with_row_gradient(self.embeddings, ids, weights) + self.bias
        vec = _take_rows(self.embeddings, ids)  # [N, L, D]
        # [N, 1, L] @ [N, L, D]: one batched MatMul instead of Mul + ReduceSum over an [N, L, D] temporary
        # (ONNX Runtime, batch 64: 77k -> 134k rows/s per core, identical scores)
        return ops.squeeze(ops.matmul(ops.expand_dims(weights, 1), vec), axis=1) + self.bias

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "n_buckets": self.n_buckets,
            "dim": self.dim,
            "seed": self.seed,
            "init_scale": self.init_scale,
        }


class LazyAdam(keras.optimizers.Adam):
    """Adam whose sparse (embedding) updates touch only the rows present in the batch (TensorFlow backend).

    Dense Adam keeps moving every embedding row on stale momentum after its feature was last seen, which both
    costs a full pass over the table per step and over-shoots rare hashed features.

    A sparse step gathers the batch's rows of the table and of both moments into three scratch variables, updates
    them with TensorFlow's fused Adam kernel (`ResourceApplyAdam`: one multi-threaded pass, Adam's own formula and
    bias correction) and writes them back (`ResourceScatterUpdate`). Written as separate tensor operations, the
    same update took ~12 passes over the [rows, 384] block (~12,700 distinct rows per JD batch of 256); measured on
    JD: 103 → 72 ms a step (`bench/RESULTS.md`, thirty-fifth session).
    """

    def __init__(
        self,
        *args,
        sparse_lr_multiplier: float = 1.0,
        sparse_weight_decay: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.sparse_lr_multiplier = sparse_lr_multiplier
        self.sparse_weight_decay = sparse_weight_decay
        self._row_scratch: dict[str, list] = {}

    def _scratch(self, dtype) -> list:
        """Three variables of any shape per dtype (the rows of the table, m and v of one step), made once."""
        import tensorflow as tf

        key = tf.as_dtype(dtype).name
        if key not in self._row_scratch:
            with tf.init_scope():
                self._row_scratch[key] = [
                    tf.Variable(tf.zeros([0, 0], dtype), shape=tf.TensorShape(None), trainable=False, name=name)
                    for name in ("rows", "m_rows", "v_rows")
                ]
        return self._row_scratch[key]

    def update_step(self, gradient, variable, learning_rate):
        import tensorflow as tf

        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype) * self.sparse_lr_multiplier
        step = tf.cast(self.iterations + 1, dtype)
        b1 = tf.cast(self.beta_1, dtype)
        b2 = tf.cast(self.beta_2, dtype)
        rows, pos = tf.unique(gradient.indices)
        values = tf.cast(gradient.values, dtype)
        # distinct indices (the bag's own gradient) are summed already: tf.unique keeps them in order
        g = tf.cond(
            tf.shape(rows)[0] == tf.shape(gradient.indices)[0],
            lambda: values,
            lambda: tf.math.unsorted_segment_sum(values, pos, tf.shape(rows)[0]),
        )
        i = self._get_variable_index(variable)
        targets = [_resource(variable), _resource(self._momentums[i]), _resource(self._velocities[i])]
        scratch = self._scratch(dtype)
        taken = [tf.gather(target, rows) for target in targets]
        if self.sparse_weight_decay > 0:  # decoupled decay of the touched rows only
            taken[0] = taken[0] * (1 - lr * self.sparse_weight_decay)
        for rows_of, value in zip(scratch, taken, strict=True):
            tf.raw_ops.AssignVariableOp(resource=rows_of.handle, value=value, validate_shape=False)
        tf.raw_ops.ResourceApplyAdam(
            var=scratch[0].handle,
            m=scratch[1].handle,
            v=scratch[2].handle,
            beta1_power=tf.pow(b1, step),
            beta2_power=tf.pow(b2, step),
            lr=lr,
            beta1=b1,
            beta2=b2,
            epsilon=tf.cast(self.epsilon, dtype),
            grad=g,
        )
        for target, rows_of in zip(targets, scratch, strict=True):
            target.scatter_update(tf.IndexedSlices(rows_of.read_value(), rows))
        return None


@keras.saving.register_keras_serializable(package="tagstream")
class GroupActivation(layers.Layer):
    """Logits [N,T] → probabilities: softmax inside each exclusive group's column range, sigmoid for multi."""

    def __init__(self, spans: Sequence[tuple[int, int, str]], **kwargs) -> None:
        super().__init__(**kwargs)
        self.spans = [tuple(s) for s in spans]

    def call(self, logits):
        parts = []
        for start, end, kind in self.spans:
            z = logits[:, start:end]
            parts.append(ops.softmax(z, axis=-1) if kind == "exclusive" else ops.sigmoid(z))
        return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)

    def get_config(self) -> dict:
        return {**super().get_config(), "spans": [list(s) for s in self.spans]}


@dataclass
class TaggerModels:
    """`train`: inputs → list of member logits (one loss each); `scores`: inputs → averaged probabilities."""

    train: keras.Model
    scores: keras.Model


def _spans(label_map: LabelMap) -> list[tuple[int, int, str]]:
    sl = label_map.slices()
    return [(sl[g.name][0], sl[g.name][1], g.kind) for g in label_map.groups]


def build_models(
    label_map: LabelMap, *, n_buckets: int, max_features: int, n_numeric: int, config: ModelConfig
) -> TaggerModels:
    """Build the training and scoring models (shared weights)."""
    keras.utils.set_random_seed(config.seed)
    ids = keras.Input((max_features,), dtype="int64", name="ids")
    weights = keras.Input((max_features,), dtype="float32", name="weights")
    numeric = keras.Input((n_numeric,), dtype="float32", name="numeric")
    reg = keras.regularizers.L2(config.l2) if config.l2 > 0 else None
    spans = _spans(label_map)
    sl = label_map.slices()
    act = GroupActivation(spans, name="group_activation")
    member_logits = []
    member_probs = []
    for m in range(config.ensemble):
        seed = config.seed + 1000 * m
        w = weights
        if config.input_dropout > 0:
            w = layers.Dropout(config.input_dropout, seed=seed, name=f"m{m}_feature_dropout")(w)
        # member 0's table also holds the linear member's columns (one gather/update for both)
        extra = config.linear_dim if m == 0 else 0
        x = WeightedBag(
            n_buckets, config.embed_dim + extra, seed=seed, init_scale=config.embed_init_scale, name=f"m{m}_bag"
        )(ids, w)
        if extra:
            x, lin_bag = x[:, : config.embed_dim], x[:, config.embed_dim :]
        x = layers.Activation("relu", name=f"m{m}_bag_relu")(x)
        x = layers.Concatenate(name=f"m{m}_concat")([x, numeric])
        for j, width in enumerate(config.hidden):
            x = layers.Dropout(config.dropout, seed=seed + j, name=f"m{m}_drop{j}")(x)
            x = layers.Dense(
                width,
                activation="relu",
                kernel_regularizer=reg,
                kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 10 + j),
                name=f"m{m}_dense{j}",
            )(x)
        x = layers.Dropout(config.dropout, seed=seed + 99, name=f"m{m}_drop_out")(x)
        heads: dict[str, object] = {}
        for gi, g in enumerate(label_map.groups):
            start, end = sl[g.name]
            inp = x
            if config.hierarchical and g.name in CATEGORY_GROUPS and g.parent_group in heads:
                parent = layers.Activation("softmax", name=f"m{m}_{_safe(g.name, gi)}_parent_p")(heads[g.parent_group])
                inp = layers.Concatenate(name=f"m{m}_{_safe(g.name, gi)}_cond")([x, parent])
            heads[g.name] = layers.Dense(
                end - start,
                kernel_regularizer=reg,
                kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 500 + start),
                name=f"m{m}_head_{_safe(g.name, gi)}",
            )(inp)
        outs = [heads[g.name] for g in label_map.groups]
        logits = outs[0] if len(outs) == 1 else layers.Concatenate(name=f"m{m}_logits")(outs)
        member_logits.append(logits)
        member_probs.append(act(logits))
    if config.linear_dim > 0:  # a low-rank linear member: bag columns -> flat heads, its own loss
        seed = config.seed + 7777
        x = layers.Concatenate(name="lin_concat")([lin_bag, numeric])
        outs = []
        for gi, g in enumerate(label_map.groups):
            start, end = sl[g.name]
            outs.append(
                layers.Dense(
                    end - start,
                    kernel_initializer=keras.initializers.GlorotUniform(seed=seed + start),
                    name=f"lin_head_{_safe(g.name, gi)}",
                )(x)
            )
        logits = outs[0] if len(outs) == 1 else layers.Concatenate(name="lin_logits")(outs)
        member_logits.append(logits)
        member_probs.append(act(logits))
    if len(member_probs) == 1:
        scores = layers.Identity(name="scores")(member_probs[0])
    elif config.combine == "logits":  # product of experts: one activation over the summed member logits
        scores = layers.Identity(name="scores")(act(layers.Add(name="logit_sum")(member_logits)))
    else:
        scores = layers.Average(name="scores")(member_probs)
    train_model = keras.Model([ids, weights, numeric], member_logits, name="tagger_train")
    score_model = keras.Model([ids, weights, numeric], scores, name="tagger")
    return TaggerModels(train_model, score_model)


def _safe(name: str, index: int) -> str:
    """A layer-name part for tag group `index`: Keras scope names are ASCII (`[A-Za-z0-9_.\\/>-]`), so only the
    group's ASCII letters and digits are kept (颜色 keeps none) and the index keeps the names unique."""
    ascii_part = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")[:48]
    return f"g{index}_{ascii_part}" if ascii_part else f"g{index}"


def class_weights(label_map: LabelMap, y: np.ndarray, power: float) -> np.ndarray:
    """Per-label loss weights (count / mean count)^-power inside each exclusive group, mean 1 over its products."""
    out = np.ones(len(label_map), dtype=np.float32)
    if power <= 0:
        return out
    counts = y.sum(axis=0)
    for g in label_map.groups:
        if g.kind != "exclusive":
            continue
        s, e = label_map.slices()[g.name]
        c = np.maximum(counts[s:e], 1.0)
        w = (c / c.mean()) ** (-power)
        w = np.clip(w, 0.1, 10.0)
        w /= (w * c).sum() / c.sum()  # expected weight over the group's products = 1
        out[s:e] = w
    return out


def make_loss(label_map: LabelMap, weights: np.ndarray, config: ModelConfig):
    """Masked per-group loss on logits; y_true is the multi-hot [N, T] matrix."""
    spans = _spans(label_map)
    names = label_map.group_names
    gw = [float(config.group_weights.get(n, 1.0)) for n in names]
    eps = float(config.label_smoothing)
    cw = ops.convert_to_tensor(weights.reshape(1, -1), dtype="float32")

    def loss(y_true, logits):
        total = 0.0
        for (start, end, kind), w in zip(spans, gw, strict=True):
            y = y_true[:, start:end]
            z = logits[:, start:end]
            if kind == "exclusive":
                has = ops.sum(y, axis=-1, keepdims=True)
                ys = y * (1.0 - eps) + has * (eps / (end - start))
                ce = -ops.sum(ys * ops.log_softmax(z, axis=-1), axis=-1)
                sample_w = ops.sum(y * cw[:, start:end], axis=-1)
                total = total + w * ce * sample_w
            else:
                bce = ops.mean(ops.maximum(z, 0.0) - z * y + ops.log1p(ops.exp(-ops.abs(z))), axis=-1)
                total = total + w * bce * (end - start)
        return total

    return loss


def round_embeddings(model: keras.Model, dtype: str) -> int:
    """Round every WeightedBag table of `model` to the values the bundle stores (kept as float32 in Keras):
    "float16" values, or "int8" rows × a float32 scale per row (`training.export.quantize_rows`); "float32"
    leaves them. The export then stores the tables so (half or a quarter of the float32 bundle and worker memory)
    and the ONNX model still computes what this Keras model does, so the parity gate and the evaluation describe
    the shipped model. Returns the number of tables rounded."""
    if dtype == "float32":
        return 0
    if dtype not in ("float16", "int8"):
        raise ValueError(f"dtype must be float32, float16 or int8, not {dtype!r}")
    from training.export import quantize_rows

    rounded = 0
    for layer in model._flatten_layers():  # nested members included
        if isinstance(layer, WeightedBag):
            table = np.asarray(layer.embeddings.numpy(), dtype=np.float32)
            if dtype == "float16":
                layer.embeddings.assign(table.astype(np.float16).astype(np.float32))
            else:
                q, scale = quantize_rows(table)
                layer.embeddings.assign(q.astype(np.float32) * scale[:, None])
            rounded += 1
    return rounded
