"""Keras → ONNX export and the parity gate (TensorFlow/tf2onnx are imported inside `export_onnx` only).

`check_parity` needs only onnxruntime, so it can vet any ONNX bytes (e.g. a tampered model) against reference
scores: max |onnx − keras| ≤ atol AND no decision flips at the shipped thresholds, else `ParityError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from serving.bundle import TOKEN_DIM
from serving.featurizer import FeatureBatch
from tagstream.errors import ExportError, ParityError

__all__ = [
    "OPSET",
    "ParityReport",
    "check_parity",
    "chunk_bags",
    "export_onnx",
    "fuse_sibling_heads",
    "parity_measures",
    "quantize_rows",
    "store_embeddings_as_float16",
    "store_embeddings_as_int8",
    "threshold_vector",
]

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAMES = ("ids", "weights", "numeric")
OUTPUT_NAME = "scores"
PARITY_ATOL = 1e-4
MIN_PARITY_SAMPLES = 2000


@dataclass(frozen=True, slots=True)
class ParityReport:
    """Outcome of a passed parity check."""

    samples: int
    max_abs_diff: float
    decision_flips: int
    atol: float

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (for metrics.json)."""
        return {
            "samples": self.samples,
            "max_abs_diff": self.max_abs_diff,
            "decision_flips": self.decision_flips,
            "atol": self.atol,
        }


def export_onnx(
    model: Any,
    *,
    n_numeric: int,
    opset: int = OPSET,
    embedding_dtype: str = "float32",
    bag_chunk: int = 0,
    max_tokens: int = 128,
    bag_levels: int = 0,
) -> bytes:
    """Convert the Keras scoring model to ONNX bytes with inputs ids/weights/numeric and output `scores`.

    `embedding_dtype` "float16" or "int8" stores the embedding tables so (`store_embeddings_as_float16`,
    `store_embeddings_as_int8`); the Keras tables must already hold such values (`training.model.round_embeddings`).
    `bag_chunk` > 0 computes each bag in chunks of that many token columns (see `chunk_bags`; `max_tokens` is the
    featurizer's L); `bag_levels` > 0 multiplies int8 tables' rows in integers (see `chunk_bags`; int8 tables only).
    The heads on one input become one MatMul (`fuse_sibling_heads`)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tf2onnx

    # The token axis is dynamic (named "L", at most the featurizer's max_features): the scorer passes only the columns
    # some row of a batch uses (serving.scorer). The bag's Gather and batched MatMul take any width.
    signature = [
        tf.TensorSpec((None, None), tf.int64, name="ids"),
        tf.TensorSpec((None, None), tf.float32, name="weights"),
        tf.TensorSpec((None, n_numeric), tf.float32, name="numeric"),
    ]
    light, tables = _with_placeholder_tables(model)
    try:
        tf2onnx_logger = logging.getLogger("tf2onnx")
        level = tf2onnx_logger.level
        tf2onnx_logger.setLevel(logging.ERROR)
        try:
            proto, _ = tf2onnx.convert.from_keras(light, input_signature=signature, opset=opset)
        finally:
            tf2onnx_logger.setLevel(level)
    except Exception as exc:  # tf2onnx raises many kinds
        raise ExportError(f"tf2onnx conversion failed: {exc}") from exc
    _restore_tables(proto, tables)
    proto = _name_output(proto)
    _name_token_axis(proto)
    store = {"float16": store_embeddings_as_float16, "int8": store_embeddings_as_int8}.get(embedding_dtype)
    if store is None and embedding_dtype != "float32":
        raise ExportError(f"embedding_dtype must be float32, float16 or int8, not {embedding_dtype!r}")
    if store is not None and not store(proto):
        raise ExportError(f"embedding_dtype {embedding_dtype}: the exported graph has no embedding table to store")
    levels = bag_levels if embedding_dtype == "int8" else 0
    if bag_chunk and not chunk_bags(proto, bag_chunk, max_tokens, levels):
        raise ExportError("bag_chunk: the exported graph has no bag (Gather of an initializer into a MatMul)")
    fuse_sibling_heads(proto)
    proto.producer_name = "tagstream"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"exported ONNX model is invalid: {exc}") from exc
    names = [i.name for i in proto.graph.input]
    if names != list(INPUT_NAMES):
        raise ExportError(f"exported inputs are {names}, expected {list(INPUT_NAMES)}")
    return proto.SerializeToString()


def _with_placeholder_tables(model: Any) -> tuple[Any, dict[tuple[int, int], np.ndarray]]:
    """A copy of `model` whose embedding tables (WeightedBag) have only a few rows, and the real tables keyed by
    their placeholder's shape (rows 2, 3, … tell the bags apart). tf2onnx copies every constant of the graph many
    times over: converting the placeholders and putting the real tables into the ONNX graph afterwards takes a
    few seconds instead of ~30 s for a 131072 × 384 table; the scores are the same (the parity gate checks them)."""
    import keras

    from training.model import WeightedBag

    tables: dict[tuple[int, int], np.ndarray] = {}

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        if isinstance(layer, WeightedBag):
            config["n_buckets"] = 2 + len(tables)
            tables[(config["n_buckets"], layer.dim)] = np.asarray(layer.embeddings.numpy(), dtype=np.float32)
        return layer.__class__.from_config(config)

    light = keras.models.clone_model(model, clone_function=clone)
    originals = model._flatten_layers(include_self=False)
    copies = light._flatten_layers(include_self=False)
    for original, copy in zip(originals, copies, strict=True):
        if original.name != copy.name:
            raise ExportError(f"cloned layers differ: {original.name} / {copy.name}")
        values = original.get_weights()
        if isinstance(original, WeightedBag):
            values[0] = values[0][: copy.n_buckets]
        copy.set_weights(values)
    return light, tables


def _restore_tables(proto: onnx.ModelProto, tables: Mapping[tuple[int, int], np.ndarray]) -> None:
    """Put the real embedding tables in place of their placeholders (the Gather tables of the same shape)."""
    gathered = {n.input[0] for n in proto.graph.node if n.op_type == "Gather" and n.input}
    found: dict[tuple[int, int], list[onnx.TensorProto]] = {}
    for init in proto.graph.initializer:
        shape = tuple(init.dims)
        if init.name in gathered and shape in tables:
            found.setdefault(shape, []).append(init)  # type: ignore[arg-type]
    for shape, table in tables.items():
        inits = found.get(shape, [])
        if len(inits) != 1:
            raise ExportError(f"embedding table {shape}: {len(inits)} placeholder initializers in the ONNX graph")
        inits[0].CopyFrom(onnx.numpy_helper.from_array(table, inits[0].name))


def _users(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that take it as an input."""
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _splice(
    graph: onnx.GraphProto,
    *,
    before: Mapping[int, list[onnx.NodeProto]] | None = None,
    after: Mapping[int, list[onnx.NodeProto]] | None = None,
    drop: set[int] | frozenset[int] = frozenset(),
) -> None:
    """Rebuild the graph's node list in order: for each node (keyed by `id(node)`) its `before` nodes, the node
    itself unless it is in `drop`, then its `after` nodes."""
    before, after = before or {}, after or {}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        nodes += before.get(id(node), [])
        if id(node) not in drop:
            nodes.append(node)
        nodes += after.get(id(node), [])
    del graph.node[:]
    graph.node.extend(nodes)


def _float32_table(
    node: onnx.NodeProto,
    tables: Mapping[str, onnx.TensorProto],
    users: Mapping[str, list[onnx.NodeProto]],
    min_rows: int,
) -> onnx.TensorProto | None:
    """The float32 [rows ≥ min_rows, D] initializer `node` gathers from, when only that Gather reads it."""
    table = tables.get(node.input[0]) if node.op_type == "Gather" and node.input else None
    if (
        table is None
        or table.data_type != onnx.TensorProto.FLOAT
        or len(table.dims) != 2
        or table.dims[0] < min_rows
        or len(users[table.name]) != 1
    ):
        return None
    return table


def store_embeddings_as_float16(proto: onnx.ModelProto, min_rows: int = 1024) -> int:
    """Store the float32 tables that Gather nodes index (≥ `min_rows` rows) as float16, followed by a Cast of the
    gathered rows back to float32. Lossless for tables holding float16-representable values; ONNX Runtime keeps
    the table in float16 (half the memory) and casts only the rows a batch looks up. Returns the tables converted."""
    graph = proto.graph
    tables = {t.name: t for t in graph.initializer}
    users = _users(graph)
    converted = 0
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        new_nodes.append(node)
        table = _float32_table(node, tables, users, min_rows)
        if table is None:
            continue
        values = onnx.numpy_helper.to_array(table)
        half = values.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), values):
            raise ExportError(f"{table.name}: values are not float16-representable; round the Keras table first")
        table.CopyFrom(onnx.numpy_helper.from_array(half, table.name))
        gathered = node.output[0]
        node.output[0] = f"{gathered}_float16"
        new_nodes.append(
            onnx.helper.make_node(
                "Cast", [node.output[0]], [gathered], to=onnx.TensorProto.FLOAT, name=f"{node.name}_to_float32"
            )
        )
        converted += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    return converted


def quantize_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: values ≈ q · scale[:, None], q in [-127, 127], each row's largest |value| → ±127
    (an all-zero row gets scale 1). Rows of different magnitudes (frequent and rare features) keep 8 bits each."""
    values = np.asarray(values, dtype=np.float32)
    peak = np.abs(values).max(axis=1)
    scale = np.where(peak > 0, peak / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(values / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def store_embeddings_as_int8(proto: onnx.ModelProto, min_rows: int = 1024) -> int:
    """Store each weighted bag's float32 table (≥ `min_rows` rows, Gather → batched MatMul with the weights
    [N, 1, L]) as int8 rows with one float32 scale per row: the Gather's rows are cast to float32, and each row's
    scale multiplies its token's weight instead (Σ_l w_l · s_l · q_l), so nothing [N, L, D]-sized is rescaled.
    The table must hold values `quantize_rows` reproduces (`training.model.round_embeddings`); a quarter of the
    float32 memory. Returns the tables converted."""
    graph = proto.graph
    tables = {t.name: t for t in graph.initializer}
    users = _users(graph)
    before: dict[int, list[onnx.NodeProto]] = {}  # id of a bag's MatMul -> nodes that scale its weights
    after: dict[int, list[onnx.NodeProto]] = {}  # id of a bag's Gather -> the Cast of its int8 rows
    for node in graph.node:
        table = _float32_table(node, tables, users, min_rows)
        if table is None or len(users.get(node.output[0], [])) != 1:
            continue
        matmul = users[node.output[0]][0]
        if matmul.op_type != "MatMul" or matmul.input[1] != node.output[0]:
            continue
        values = onnx.numpy_helper.to_array(table)
        q, scale = quantize_rows(values)
        peak = np.abs(values).max(axis=1)
        if np.any(np.abs(q.astype(np.float32) * scale[:, None] - values).max(axis=1) > 1e-5 * peak):
            raise ExportError(f"{table.name}: values are not int8 rows × scale; round the Keras table first")
        table.CopyFrom(onnx.numpy_helper.from_array(q, table.name))
        base = node.name or node.output[0]
        names = {k: f"{base}_int8_{k}" for k in ("scale", "axis", "token_scale", "token_scale3", "weights")}
        graph.initializer.extend(
            [
                onnx.numpy_helper.from_array(scale, names["scale"]),
                onnx.numpy_helper.from_array(np.array([1], np.int64), names["axis"]),
            ]
        )
        ids, weights, gathered = node.input[1], matmul.input[0], node.output[0]
        before[id(matmul)] = [
            onnx.helper.make_node("Gather", [names["scale"], ids], [names["token_scale"]], name=names["token_scale"]),
            onnx.helper.make_node(
                "Unsqueeze", [names["token_scale"], names["axis"]], [names["token_scale3"]], name=names["token_scale3"]
            ),
            onnx.helper.make_node("Mul", [weights, names["token_scale3"]], [names["weights"]], name=names["weights"]),
        ]
        matmul.input[0] = names["weights"]
        node.output[0] = f"{gathered}_int8"
        after[id(node)] = [
            onnx.helper.make_node(
                "Cast", [node.output[0]], [gathered], to=onnx.TensorProto.FLOAT, name=f"{base}_to_float32"
            )
        ]
    if not after:
        return 0
    _splice(graph, before=before, after=after)
    return len(after)


def chunk_bags(proto: onnx.ModelProto, chunk: int, max_tokens: int, levels: int = 0) -> int:
    """Compute each weighted bag — Gather of an embedding table by ids [N, L] (then a Cast), batched MatMul with
    the weights [N, 1, L] — in slices of `chunk` token columns whose partial sums are added, skipping the padding.

    - Each slice's gathered rows [n, chunk, D] stay in the CPU cache between the Gather and the MatMul, instead of
      all [N, L, D] (12.6 MB at N=64, L=128, D=384) going through memory.
    - The rows are ordered by their last column with a non-zero weight (TopK, longest first), so slice c needs only
      the first k_c rows: those that have a weight in or after its columns. A row's zero-weight columns add nothing,
      so skipping them leaves every sum as it was. Titles of different lengths padded to the longest waste ~25 %
      of the work otherwise. The sums are put back in input order at the end, so any row order and any padding
      (also zeros between features) give the same result.
    - The last slice takes every column left, so a batch wider than `max_tokens` loses nothing.
    - `levels` > 0, for a table stored as int8 rows (`store_embeddings_as_int8`): the int8 rows are not cast to
      float32 at all. Each row's weights (≥ 0, as the featurizer's are) are written as `levels` 8-bit digits of
      base 255 relative to the row's largest weight, and MatMulInteger multiplies them with the int8 rows into
      exact int32 sums. A weight is then off by at most half of 255^-levels of its row's largest (2 levels: 7.7e-6
      of it; scores within ~2e-5 of the float32 bag). Casting the gathered rows to float32 was the largest part of
      the bag's time, since it writes 4 bytes per value read.

    Returns the bags rewritten."""
    if levels < 0:
        raise ExportError(f"bag levels must be >= 0, not {levels}")
    graph = proto.graph
    tables = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    users = _users(graph)
    replace: dict[int, list[onnx.NodeProto]] = {}  # id of the bag's MatMul -> its slices
    drop: set[int] = set()
    slices = max(1, -(-max_tokens // chunk))
    for gather in graph.node:
        if gather.op_type != "Gather" or gather.input[0] not in tables or len(users.get(gather.output[0], [])) != 1:
            continue
        chain = [gather]
        nxt = users[gather.output[0]][0]
        if nxt.op_type == "Cast" and len(users.get(nxt.output[0], [])) == 1:
            chain.append(nxt)
            nxt = users[nxt.output[0]][0]
        if nxt.op_type != "MatMul" or nxt.input[1] != chain[-1].output[0] or nxt.input[0] not in producers:
            continue
        cast_to = next(a.i for a in chain[1].attribute if a.name == "to") if len(chain) == 2 else None
        integer = levels if tables[gather.input[0]].data_type == onnx.TensorProto.INT8 else 0
        if levels and not integer:
            raise ExportError(f"bag levels need a table of int8 rows; {gather.input[0]} is not (embedding_dtype int8)")
        base = f"{gather.name or gather.output[0]}_chunk"
        graph.initializer.extend(_chunk_constants(base, chunk, slices, integer))
        replace[id(nxt)] = _sorted_chunks(
            base, gather.input[0], gather.input[1], nxt.input[0], nxt.output[0], slices, cast_to, integer
        )
        drop.update(id(n) for n in (*chain, nxt))
    if not replace:
        return 0
    _splice(graph, before=replace, drop=drop)
    return len(replace)


def _chunk_constants(base: str, chunk: int, slices: int, levels: int) -> list[onnx.TensorProto]:
    """The constants of one bag's sorted slices (`_sorted_chunks`)."""
    first_columns = np.arange(slices, dtype=np.int64) * chunk
    last_columns = np.append(first_columns[1:], np.iinfo(np.int64).max)
    arrays = {
        "zero": np.array(0, np.float32),
        "last_axis": np.array(-1, np.int64),
        "one_f": np.array(1, np.float32),
        "axis1": np.array([1], np.int64),
        "axis0": np.array([0], np.int64),
        "first": first_columns.astype(np.float32)[:, None],  # [C, 1]: a row is in slice c if its length > this
        "ends": last_columns[:, None],  # [C, 1]
        "pad_before": np.zeros((slices, 3), np.int64),
        "pad_after": np.zeros((slices, 2), np.int64),
        "axes_ids": np.array([0, 1], np.int64),
        "axes_w": np.array([0, 2], np.int64),
    }
    arrays.update({f"{c}_start": np.array([0, first_columns[c]], np.int64) for c in range(slices)})
    arrays.update({f"{c}_index": np.array(c, np.int64) for c in range(slices)})
    if levels:
        arrays.update(
            {
                "base": np.array(_DIGIT_BASE, np.float32),
                "tiny": np.array(np.finfo(np.float32).tiny, np.float32),
                "digit_values": np.array([[float(_DIGIT_BASE) ** -i for i in range(levels)]], np.float32),  # [1, n]
            }
        )
    return [onnx.numpy_helper.from_array(v, f"{base}_{k}") for k, v in arrays.items()]


_DIGIT_BASE = 255  # an integer bag's weight digits are uint8 values 0..255, in base 255


def _sorted_chunks(
    base: str, table: str, ids: str, weights: str, out: str, slices: int, cast_to: int | None, levels: int
) -> list[onnx.NodeProto]:
    """The nodes of one bag computed in row-sorted slices: ids [N, L], weights [N, 1, L] -> `out` [N, 1, D]; with
    `levels`, the weights as that many 8-bit digits and MatMulInteger with the int8 rows (see `chunk_bags`)."""
    make = onnx.helper.make_node
    k = f"{base}_"
    nodes = [
        # a row's length: 1 + its last column with a non-zero weight (0 for a row of zeros)
        make("Shape", [weights], [k + "shape"], name=k + "shape"),
        make("Gather", [k + "shape", k + "last_axis"], [k + "width"], axis=0, name=k + "width"),
        make("Cast", [k + "width"], [k + "width_f"], to=onnx.TensorProto.FLOAT, name=k + "width_f"),
        make("Add", [k + "width_f", k + "one_f"], [k + "limit"], name=k + "limit"),
        make("Range", [k + "one_f", k + "limit", k + "one_f"], [k + "columns"], name=k + "columns"),
        make("Equal", [weights, k + "zero"], [k + "unused"], name=k + "unused"),
        make("Where", [k + "unused", k + "zero", k + "columns"], [k + "used_at"], name=k + "used_at"),
        make("ReduceMax", [k + "used_at"], [k + "last"], axes=[1, 2], keepdims=0, name=k + "last"),
        make("Slice", [k + "shape", k + "axis0", k + "axis1"], [k + "n"], name=k + "n"),
        # longest rows first, and the inverse order to put the sums back
        make(
            "TopK",
            [k + "last", k + "n"],
            [k + "last_sorted", k + "order"],
            axis=0,
            largest=1,
            sorted=1,
            name=k + "order",
        ),
        make(
            "TopK",
            [k + "order", k + "n"],
            [k + "order_sorted", k + "inverse"],
            axis=0,
            largest=0,
            sorted=1,
            name=k + "inverse",
        ),
        make("Gather", [ids, k + "order"], [k + "ids"], axis=0, name=k + "ids"),
        make("Gather", [weights, k + "order"], [k + "weights"], axis=0, name=k + "weights"),
        # rows per slice: k_c = rows whose last used column is at or after the slice's first column
        make("Less", [k + "first", k + "last"], [k + "in_slice"], name=k + "in_slice"),
        make("Cast", [k + "in_slice"], [k + "in_slice_i"], to=onnx.TensorProto.INT64, name=k + "in_slice_i"),
        make("ReduceSum", [k + "in_slice_i", k + "axis1"], [k + "rows"], keepdims=1, name=k + "rows"),
        make("Concat", [k + "rows", k + "ends"], [k + "slice_ends"], axis=1, name=k + "slice_ends"),
        make("Sub", [k + "n", k + "rows"], [k + "rest"], name=k + "rest"),
        make("Concat", [k + "pad_before", k + "rest", k + "pad_after"], [k + "pads"], axis=1, name=k + "pads"),
    ]
    sliced = k + "weights"
    if levels:
        nodes += _weight_digits(k, levels)
        sliced = k + "digits"
    partials = []
    for c in range(slices):
        p = f"{base}{c}_"
        rows = p + "rows"
        nodes += [
            make("Gather", [k + "slice_ends", f"{k}{c}_index"], [p + "end"], axis=0, name=p + "end"),
            make("Slice", [k + "ids", f"{k}{c}_start", p + "end", k + "axes_ids"], [p + "ids"], name=p + "ids"),
            make("Slice", [sliced, f"{k}{c}_start", p + "end", k + "axes_w"], [p + "w"], name=p + "w"),
            make("Gather", [table, p + "ids"], [rows], name=p + "gather"),
        ]
        if levels:  # exact int32 sums of digit × int8 value, [n, levels, D]
            nodes += [
                make("MatMulInteger", [p + "w", rows], [p + "sum_i32"], name=p + "matmul"),
                make("Cast", [p + "sum_i32"], [p + "sum"], to=onnx.TensorProto.FLOAT, name=p + "sum"),
            ]
        else:
            if cast_to is not None:
                nodes.append(make("Cast", [rows], [rows + "_cast"], to=cast_to, name=p + "cast"))
                rows += "_cast"
            nodes.append(make("MatMul", [p + "w", rows], [p + "sum"], name=p + "matmul"))
        nodes += [
            make("Gather", [k + "pads", f"{k}{c}_index"], [p + "pads"], axis=0, name=p + "pads"),
            make("Pad", [p + "sum", p + "pads"], [p + "padded"], name=p + "padded"),
        ]
        partials.append(p + "padded")
    nodes.append(make("Sum", partials, [k + "total"], name=k + "total"))
    total = k + "total"
    if levels:  # Σ_i digit_sum_i · 255^-i, times the row's weight unit (its largest weight / 255)
        nodes += [
            make("MatMul", [k + "digit_values", total], [k + "digit_total"], name=k + "digit_total"),
            make("Div", [k + "top", k + "base"], [k + "unit"], name=k + "unit"),
            make("Mul", [k + "digit_total", k + "unit"], [k + "scaled"], name=k + "scaled"),
        ]
        total = k + "scaled"
    nodes.append(make("Gather", [total, k + "inverse"], [out], axis=0, name=k + "in_input_order"))
    return nodes


def _weight_digits(k: str, levels: int) -> list[onnx.NodeProto]:
    """The sorted weights [N, 1, L] (≥ 0) as `levels` base-255 digits of their share of the row's largest weight,
    uint8 [N, levels, L]: w / top · 255 = d_0 + d_1/255 + …, the last digit rounded."""
    make = onnx.helper.make_node
    nodes = [
        make("ReduceMax", [k + "weights"], [k + "top_raw"], axes=[1, 2], keepdims=1, name=k + "top_raw"),
        make("Max", [k + "top_raw", k + "tiny"], [k + "top"], name=k + "top"),  # a row of zeros stays zeros
        make("Div", [k + "weights", k + "top"], [k + "share"], name=k + "share"),
        make("Mul", [k + "share", k + "base"], [k + "rest0"], name=k + "rest0"),
    ]
    digits = []
    for i in range(levels):
        rest, digit = f"{k}rest{i}", f"{k}digit{i}"
        if i == levels - 1:
            nodes.append(make("Round", [rest], [digit], name=digit))
        else:
            nodes += [
                make("Floor", [rest], [digit], name=digit),
                make("Sub", [rest, digit], [f"{k}frac{i}"], name=f"{k}frac{i}"),
                make("Mul", [f"{k}frac{i}", k + "base"], [f"{k}rest{i + 1}"], name=f"{k}rest{i + 1}"),
            ]
        digits.append(digit)
    nodes += [
        make("Concat", digits, [k + "digits_f"], axis=1, name=k + "digits_f"),
        make("Cast", [k + "digits_f"], [k + "digits"], to=onnx.TensorProto.UINT8, name=k + "digits"),
    ]
    return nodes


def fuse_sibling_heads(proto: onnx.ModelProto) -> int:
    """Compute the dense heads that read the same input — MatMul by a constant [K, M_i], then Add of a constant
    [M_i] — as one MatMul and Add whose columns are split again: the same dot products, one kernel call instead of
    one per head (the tagger has a head per tag group, 7 on the hidden layer and 7 on the linear member). When one
    Concat takes exactly the heads' outputs, it takes the fused output as it is. Returns the heads fused."""
    graph = proto.graph
    tables = {t.name: t for t in graph.initializer}
    users = _users(graph)
    siblings: dict[str, list[tuple[onnx.NodeProto, onnx.NodeProto]]] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in tables or len(users.get(node.output[0], [])) != 1:
            continue
        add = users[node.output[0]][0]
        if add.op_type != "Add" or list(add.input[:1]) != [node.output[0]] or add.input[1] not in tables:
            continue
        w, b = tables[node.input[1]], tables[add.input[1]]
        if len(w.dims) == 2 and list(b.dims) == [w.dims[1]] and w.data_type == b.data_type == onnx.TensorProto.FLOAT:
            siblings.setdefault(node.input[0], []).append((node, add))
    replace: dict[int, list[onnx.NodeProto]] = {}
    drop: set[int] = set()
    fused = 0
    ranks = _ranks(proto) if any(len(heads) > 1 for heads in siblings.values()) else {}
    for source, heads in siblings.items():
        if len(heads) < 2:
            continue
        concat = _single_concat_of(users, [add.output[0] for _, add in heads], ranks)
        if concat is not None:  # the Concat's order, so it can be dropped
            heads.sort(key=lambda head: list(concat.input).index(head[1].output[0]))
        base = f"{heads[0][0].name or heads[0][0].output[0]}_fused"
        weights = np.concatenate([onnx.numpy_helper.to_array(tables[m.input[1]]) for m, _ in heads], axis=1)
        bias = np.concatenate([onnx.numpy_helper.to_array(tables[a.input[1]]) for _, a in heads])
        sizes = np.array([tables[m.input[1]].dims[1] for m, _ in heads], np.int64)
        graph.initializer.extend(
            onnx.numpy_helper.from_array(v, f"{base}_{k}")
            for k, v in (("weights", weights), ("bias", bias), ("sizes", sizes))
        )
        out = concat.output[0] if concat is not None else f"{base}_out"
        nodes = [
            onnx.helper.make_node("MatMul", [source, f"{base}_weights"], [f"{base}_product"], name=f"{base}_matmul"),
            onnx.helper.make_node("Add", [f"{base}_product", f"{base}_bias"], [out], name=f"{base}_add"),
        ]
        if concat is None:
            outputs = [add.output[0] for _, add in heads]
            nodes.append(onnx.helper.make_node("Split", [out, f"{base}_sizes"], outputs, axis=-1, name=f"{base}_split"))
        else:
            drop.add(id(concat))
        replace[id(heads[0][0])] = nodes
        drop.update(id(n) for head in heads for n in head)
        fused += len(heads)
    if not fused:
        return 0
    _splice(graph, before=replace, drop=drop)
    _drop_unused_initializers(graph)  # the heads' own weights and biases
    return fused


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Remove the initializers no node reads any more (ONNX Runtime would warn about each, and they take space)."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _single_concat_of(
    users: Mapping[str, list[onnx.NodeProto]], outputs: list[str], ranks: Mapping[str, int]
) -> onnx.NodeProto | None:
    """The Concat on the last axis that is the only user of every one of `outputs` and takes exactly them (in any
    order), if there is one."""
    consumers = {id(u): u for o in outputs for u in users.get(o, [])}
    if len(consumers) != 1 or any(len(users.get(o, [])) != 1 for o in outputs):
        return None
    concat = next(iter(consumers.values()))
    if concat.op_type != "Concat" or sorted(concat.input) != sorted(outputs):
        return None
    axis = next((a.i for a in concat.attribute if a.name == "axis"), None)
    rank = ranks.get(concat.output[0])
    return concat if axis is not None and rank is not None and axis in (-1, rank - 1) else None


def _ranks(proto: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> rank, from ONNX shape inference on a copy of the graph whose initializers are typed inputs
    (so the embedding tables are not copied)."""
    graph = proto.graph
    light = onnx.helper.make_graph(
        list(graph.node),
        "ranks",
        list(graph.input)
        + [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer],
        list(graph.output),
    )
    model = onnx.helper.make_model(light, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception as exc:  # no ranks: the fused heads keep their Split, which is right at any rank
        log.warning("shape inference failed (%s); fused heads keep their Split", exc)
        return {}
    return {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in list(inferred.value_info) + list(inferred.output)
        if v.type.tensor_type.HasField("shape")
    }


def _name_token_axis(proto: onnx.ModelProto) -> None:
    """Call the dynamic token axis of ids/weights `L` (tf2onnx names it `unk__<n>`)."""
    for vi in proto.graph.input:
        if vi.name in ("ids", "weights"):
            dim = vi.type.tensor_type.shape.dim[1]
            dim.ClearField("dim_value")
            dim.dim_param = TOKEN_DIM


def _name_output(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Make the single graph output be called `scores` (an Identity node when it is named otherwise)."""
    graph = proto.graph
    if len(graph.output) != 1:
        raise ExportError(f"expected one output, got {[o.name for o in graph.output]}")
    out = graph.output[0]
    if out.name == OUTPUT_NAME:
        return proto
    graph.node.append(onnx.helper.make_node("Identity", [out.name], [OUTPUT_NAME], name="scores_identity"))
    new_out = onnx.ValueInfoProto()
    new_out.CopyFrom(out)
    new_out.name = OUTPUT_NAME
    graph.output.remove(out)
    graph.output.append(new_out)
    return proto


def threshold_vector(tags: list[str], thresholds: Mapping[str, Any]) -> np.ndarray:
    """thresholds.json object (or a plain tag → threshold dict) → float32 vector in label order."""
    if "per_tag" in thresholds:
        per_tag, default = thresholds["per_tag"], float(thresholds.get("default", 0.5))
    else:
        per_tag, default = thresholds, 0.5
    return np.asarray([float(per_tag.get(t, default)) for t in tags], dtype=np.float32)


def parity_measures(got: np.ndarray, reference: np.ndarray, thresholds: np.ndarray) -> tuple[float, int]:
    """The parity gate's two measures: max |got − reference| and the decisions (score ≥ its tag's threshold) that
    differ between the two."""
    diff = float(np.max(np.abs(got - reference))) if got.size else 0.0
    th = np.asarray(thresholds, dtype=np.float32).reshape(1, -1)
    return diff, int(np.sum((got >= th) != (reference >= th)))


def check_parity(
    onnx_bytes: bytes,
    keras_scores: np.ndarray,
    features: FeatureBatch,
    thresholds: np.ndarray,
    *,
    atol: float = PARITY_ATOL,
    min_samples: int = 1,
    batch_size: int = 4096,
) -> ParityReport:
    """Score `features` with ONNX Runtime and compare with `keras_scores`; ParityError on any mismatch."""
    n = len(features)
    keras_scores = np.asarray(keras_scores, dtype=np.float32)
    if n < min_samples:
        raise ParityError(f"parity needs at least {min_samples} samples, got {n}")
    if keras_scores.shape[0] != n:
        raise ParityError(f"{keras_scores.shape[0]} reference rows for {n} feature rows")
    try:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
        outs = []
        for s in range(0, n, batch_size):
            part = features.take(slice(s, s + batch_size))
            outs.append(sess.run([OUTPUT_NAME], part.as_inputs())[0])
        got = np.concatenate(outs).astype(np.float32)
    except Exception as exc:
        raise ParityError(f"ONNX Runtime could not score the parity set: {exc}") from exc
    if got.shape != keras_scores.shape:
        raise ParityError(f"ONNX scores have shape {got.shape}, Keras {keras_scores.shape}")
    if not np.all(np.isfinite(got)):
        raise ParityError("ONNX scores hold NaN or inf")
    diff, flips = parity_measures(got, keras_scores, thresholds)
    if diff > atol or flips:
        raise ParityError(
            f"ONNX/Keras parity failed on {n} samples: max |diff| = {diff:.3g} (limit {atol:g}), "
            f"{flips} decision flips at the shipped thresholds"
        )
    return ParityReport(samples=n, max_abs_diff=diff, decision_flips=flips, atol=atol)
