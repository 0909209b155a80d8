"""Rewrites of the exported ONNX bag: the table stored as float16 or int8, the bag computed in slices."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tagstream.errors import ExportError
from training.export import (
    chunk_bags,
    fuse_sibling_heads,
    quantize_rows,
    store_embeddings_as_float16,
    store_embeddings_as_int8,
)


def _bag_model(table: np.ndarray) -> onnx.ModelProto:
    """ids [N, L] → Gather(table) [N, L, D] → ReduceSum over L: the shape of the tagger's embedding bag."""
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["rows"], name="bag_gather"),
        helper.make_node("ReduceSum", ["rows", "axes"], ["out"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "bag",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, table.shape[1]])],
        initializer=[numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([1]), "axes")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["out"], {"ids": ids})[0]


def test_a_rounded_table_is_stored_as_float16_with_identical_outputs() -> None:
    rng = np.random.default_rng(0)
    table = rng.normal(0, 0.05, (4096, 8)).astype(np.float16).astype(np.float32)
    model = _bag_model(table)
    ids = rng.integers(0, 4096, (50, 3))
    before = _run(model, ids)
    size_before = model.ByteSize()

    assert store_embeddings_as_float16(model) == 1
    onnx.checker.check_model(model, full_check=True)
    stored = next(t for t in model.graph.initializer if t.name == "table")
    assert stored.data_type == TensorProto.FLOAT16
    assert model.ByteSize() < 0.6 * size_before
    assert [n.op_type for n in model.graph.node] == ["Gather", "Cast", "ReduceSum"]
    np.testing.assert_array_equal(_run(model, ids), before)


def test_a_table_that_float16_would_change_is_refused() -> None:
    table = np.full((2048, 4), 0.1, dtype=np.float32)  # 0.1 is not a float16 value
    with pytest.raises(ExportError, match="not float16-representable"):
        store_embeddings_as_float16(_bag_model(table))


def test_small_tables_stay_float32() -> None:
    table = np.ones((16, 4), dtype=np.float32)
    model = _bag_model(table)
    assert store_embeddings_as_float16(model) == 0
    assert model.graph.initializer[0].data_type == TensorProto.FLOAT


def _weighted_bag_model(table: np.ndarray) -> onnx.ModelProto:
    """ids, weights [N, L] (L dynamic) → Σ_l weights_l · table[ids_l] as the tagger exports it: Gather, then a batched
    MatMul of the weights [N, 1, L] with the gathered rows [N, L, D]."""
    nodes = [
        helper.make_node("Unsqueeze", ["weights", "axis1"], ["w3"]),
        helper.make_node("Gather", ["table", "ids"], ["rows"], name="bag_gather"),
        helper.make_node("MatMul", ["w3", "rows"], ["summed"]),
        helper.make_node("Squeeze", ["summed", "axis1"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "weighted_bag",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [None, "L"]),
            helper.make_tensor_value_info("weights", TensorProto.FLOAT, [None, "L"]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, table.shape[1]])],
        initializer=[numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([1]), "axis1")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_bag_computed_in_slices_gives_the_same_sums_for_every_width() -> None:
    rng = np.random.default_rng(1)
    table = rng.normal(0, 0.05, (4096, 16)).astype(np.float16).astype(np.float32)
    whole, sliced = _weighted_bag_model(table), _weighted_bag_model(table)
    assert store_embeddings_as_float16(sliced) == 1 and chunk_bags(sliced, chunk=8, max_tokens=20) == 1
    onnx.checker.check_model(sliced, full_check=True)
    table_gathers = [n for n in sliced.graph.node if n.op_type == "Gather" and n.input[0] == "table"]
    assert len(table_gathers) == [n.op_type for n in sliced.graph.node].count("MatMul") == 3  # 8 + 8 + the rest
    run_whole = ort.InferenceSession(whole.SerializeToString(), providers=["CPUExecutionProvider"])
    run_sliced = ort.InferenceSession(sliced.SerializeToString(), providers=["CPUExecutionProvider"])
    for width in (1, 7, 8, 20, 33):  # within a slice, on a slice edge, the featurizer's L, wider than it
        feeds = {
            "ids": rng.integers(0, 4096, (5, width)),
            "weights": rng.random((5, width), dtype=np.float32) * (rng.random((5, width)) < 0.8),
        }
        expected = run_whole.run(["out"], feeds)[0]
        np.testing.assert_allclose(run_sliced.run(["out"], feeds)[0], expected, rtol=0, atol=1e-6)
        assert np.abs(expected).max() > 0


def test_sliced_bags_skip_padding_without_changing_any_row() -> None:
    """Rows of every length in any order, features after zero-weight gaps, an all-zero row: the sums of each row stay
    in that row (the slices order rows by length and put the sums back)."""
    rng = np.random.default_rng(5)
    table = rng.normal(0, 0.05, (4096, 16)).astype(np.float16).astype(np.float32)
    whole, sliced = _weighted_bag_model(table), _weighted_bag_model(table)
    assert store_embeddings_as_float16(sliced) == 1 and chunk_bags(sliced, chunk=8, max_tokens=24) == 1
    run_whole = ort.InferenceSession(whole.SerializeToString(), providers=["CPUExecutionProvider"])
    run_sliced = ort.InferenceSession(sliced.SerializeToString(), providers=["CPUExecutionProvider"])
    lengths = np.array([3, 24, 0, 9, 17, 8, 1, 24, 16, 12])  # unsorted; on and beside the slice edges 8 and 16
    weights = np.zeros((len(lengths), 24), np.float32)
    for row, n in enumerate(lengths):
        weights[row, :n] = rng.random(n, dtype=np.float32) + 0.1
    weights[3, 2:5] = 0.0  # a gap before the row's last features
    weights[4, :10] = 0.0  # only features in the second and third slice
    feeds = {"ids": rng.integers(0, 4096, weights.shape), "weights": weights}
    expected = run_whole.run(["out"], feeds)[0]
    got = run_sliced.run(["out"], feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert np.all(got[2] == 0) and np.all(np.abs(expected[[0, 1, 3, 4]]).max(axis=-1) > 0)
    for row in (0, 7):  # one row alone, as the worker scores a single product
        one = {k: v[row : row + 1] for k, v in feeds.items()}
        np.testing.assert_allclose(run_sliced.run(["out"], one)[0], expected[row : row + 1], rtol=0, atol=1e-6)


def _int8_rounded(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    """A table as `round_embeddings(..., "int8")` leaves it: rows of very different magnitudes, q · scale."""
    table = rng.normal(0, 1, (rows, dim)) * 10.0 ** rng.uniform(-4, 0, (rows, 1))
    table[5] = 0.0  # an all-zero row (e.g. padding)
    q, scale = quantize_rows(table)
    return q.astype(np.float32) * scale[:, None]


def test_int8_rows_keep_each_rows_own_scale() -> None:
    rng = np.random.default_rng(2)
    table = rng.normal(0, 1, (64, 8)) * 10.0 ** rng.uniform(-4, 0, (64, 1))
    q, scale = quantize_rows(table)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and np.abs(q).max(axis=1).min() == 127
    error = np.abs(q * scale[:, None] - table).max(axis=1)
    assert np.all(error <= 0.5 * scale + 1e-12)  # half a step of the row's own scale, small rows included
    assert np.all(error <= np.abs(table).max(axis=1) / 254 + 1e-12)
    again, scale_again = quantize_rows(q.astype(np.float32) * scale[:, None])
    np.testing.assert_array_equal(again, q)  # rounding is idempotent: export finds the same int8 rows
    np.testing.assert_allclose(scale_again, scale, rtol=1e-6)


def test_an_int8_table_gives_the_same_bag_sums_whole_and_in_slices() -> None:
    rng = np.random.default_rng(3)
    table = _int8_rounded(rng, 4096, 16)
    whole, stored = _weighted_bag_model(table), _weighted_bag_model(table)
    size_before = stored.ByteSize()
    assert store_embeddings_as_int8(stored) == 1
    sliced = onnx.ModelProto()
    sliced.CopyFrom(stored)
    assert chunk_bags(sliced, chunk=8, max_tokens=20) == 1
    for model in (stored, sliced):
        onnx.checker.check_model(model, full_check=True)
    table_init = next(t for t in stored.graph.initializer if t.name == "table")
    assert (
        table_init.data_type == TensorProto.INT8 and stored.ByteSize() < 0.35 * size_before
    )  # int8 + a float32 scale per 16 values
    sessions = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (whole, stored, sliced)
    ]
    for width in (1, 8, 20, 33):
        ids = rng.integers(0, 4096, (5, width))
        ids[0, 0] = 5
        feeds = {"ids": ids, "weights": rng.random((5, width), dtype=np.float32)}
        expected, *outs = (s.run(["out"], feeds)[0] for s in sessions)
        for out in outs:
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-7)


def test_a_table_that_int8_would_change_is_refused() -> None:
    table = np.random.default_rng(4).normal(0, 0.05, (2048, 8)).astype(np.float32)  # not rounded to int8 rows
    with pytest.raises(ExportError, match="not int8 rows"):
        store_embeddings_as_int8(_weighted_bag_model(table))


def test_a_graph_without_a_weighted_bag_is_left_as_it_is() -> None:
    model = _bag_model(np.ones((2048, 4), dtype=np.float32))  # ReduceSum, not a MatMul with weights
    assert chunk_bags(model, chunk=8, max_tokens=20) == 0
    assert [n.op_type for n in model.graph.node] == ["Gather", "ReduceSum"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_every_embedding_table_reaches_the_onnx_graph_in_its_own_place(dtype: str) -> None:
    """tf2onnx converts a copy with placeholder tables; each real table must come back into its own bag."""
    from tests.test_train_e2e import synthetic_products
    from training.export import export_onnx
    from training.labels import build_label_map
    from training.model import ModelConfig, WeightedBag, build_models, round_embeddings

    label_map = build_label_map(synthetic_products(120), min_support=3)
    config = ModelConfig(embed_dim=16, hidden=(8,), ensemble=2, linear_dim=8)
    model = build_models(label_map, n_buckets=2048, max_features=24, n_numeric=5, config=config).scores
    rng = np.random.default_rng(0)
    bags = [layer for layer in model._flatten_layers() if isinstance(layer, WeightedBag)]
    assert [b.embeddings.shape for b in bags] == [(2048, 24), (2048, 16)]
    for bag in bags:  # distinct, large values: a table in the wrong bag (or a placeholder row) changes the scores
        bag.embeddings.assign(rng.normal(0, 0.5, bag.embeddings.shape).astype(np.float32))
    round_embeddings(model, dtype)

    levels = 2 if dtype == "int8" else 0  # the trainer's default: int8 rows multiplied in integers
    onnx_bytes = export_onnx(model, n_numeric=5, embedding_dtype=dtype, bag_chunk=8, max_tokens=24, bag_levels=levels)
    ids = rng.integers(1, 2048, size=(64, 24), dtype=np.int64)  # rows far beyond the placeholders' few
    weights = rng.random((64, 24), dtype=np.float32)
    numeric = rng.normal(size=(64, 5)).astype(np.float32)
    keras_scores = np.asarray(model([ids, weights, numeric], training=False))
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    onnx_scores = session.run(None, {"ids": ids, "weights": weights, "numeric": numeric})[0]
    assert np.abs(onnx_scores - keras_scores).max() <= (1e-4 if levels else 1e-5)  # the parity gate's tolerance
    tables = [
        t
        for t in onnx.load_from_string(onnx_bytes).graph.initializer
        if list(t.dims[:1]) == [2048] and len(t.dims) == 2
    ]
    assert sorted(tuple(t.dims) for t in tables) == [(2048, 16), (2048, 24)]
    assert {t.data_type for t in tables} == {getattr(onnx.TensorProto, dtype.upper())}


def _heads_model(rng: np.random.Generator) -> onnx.ModelProto:
    """x [N, 6] → three dense heads (MatMul + Add) concatenated in another order than the nodes', and two heads on
    h = Relu(x) whose outputs go their own ways (a Softmax each), as the tagger's heads do."""
    inits, nodes = [], []

    def head(source: str, name: str, width: int) -> str:
        inits.extend(
            [
                numpy_helper.from_array(rng.normal(size=(6, width)).astype(np.float32), f"{name}_w"),
                numpy_helper.from_array(rng.normal(size=width).astype(np.float32), f"{name}_b"),
            ]
        )
        nodes.extend(
            [
                helper.make_node("MatMul", [source, f"{name}_w"], [f"{name}_mm"], name=f"{name}_mm"),
                helper.make_node("Add", [f"{name}_mm", f"{name}_b"], [f"{name}_out"], name=f"{name}_add"),
            ]
        )
        return f"{name}_out"

    a, b, c = head("x", "a", 3), head("x", "b", 5), head("x", "c", 2)
    nodes.append(helper.make_node("Concat", [c, a, b], ["linear"], axis=1))
    nodes.append(helper.make_node("Relu", ["x"], ["h"]))
    d, e = head("h", "d", 4), head("h", "e", 3)
    nodes += [helper.make_node("Softmax", [d], ["pd"], axis=-1), helper.make_node("Softmax", [e], ["pe"], axis=-1)]
    nodes.append(helper.make_node("Concat", ["linear", "pd", "pe"], ["out"], axis=1))
    graph = helper.make_graph(
        nodes,
        "heads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 6])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 17])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_heads_on_one_input_become_one_matmul_with_the_same_scores() -> None:
    rng = np.random.default_rng(6)
    before = _heads_model(rng)
    fused = onnx.ModelProto()
    fused.CopyFrom(before)
    assert fuse_sibling_heads(fused) == 5
    onnx.checker.check_model(fused, full_check=True)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("MatMul") == 2 and ops.count("Split") == 1  # the Concat of a, b, c takes the fused output
    assert ops.count("Concat") == 1
    read = {name for node in fused.graph.node for name in node.input}
    assert all(t.name in read for t in fused.graph.initializer)  # the heads' own weights are gone
    x = rng.normal(size=(9, 6)).astype(np.float32)
    expected, got = (
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["out"], {"x": x})[0]
        for m in (before, fused)
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_a_lone_head_is_not_fused() -> None:
    model = _weighted_bag_model(np.ones((16, 4), np.float32))
    assert fuse_sibling_heads(model) == 0


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_an_integer_bag_is_within_its_digits_of_the_float_bag(levels: int) -> None:
    """int8 rows multiplied with the weights' 8-bit digits (MatMulInteger): each weight is off by at most half a last
    digit of its row's largest weight, so each row's sum is within that bound, whatever the lengths, gaps and
    order of the rows."""
    rng = np.random.default_rng(7)
    table = _int8_rounded(rng, 4096, 16)
    whole, stored = _weighted_bag_model(table), _weighted_bag_model(table)
    assert store_embeddings_as_int8(stored) == 1 and chunk_bags(stored, chunk=8, max_tokens=24, levels=levels) == 1
    onnx.checker.check_model(stored, full_check=True)
    ops = [n.op_type for n in stored.graph.node]
    assert ops.count("MatMulInteger") == 3  # 8 + 8 + the rest
    assert not any(n.op_type == "Cast" and n.input[0].endswith("_rows") for n in stored.graph.node)  # no float rows
    lengths = np.array([3, 24, 0, 9, 17, 8, 1, 24, 16, 12, 30])  # the last one is wider than max_tokens
    weights = np.zeros((len(lengths), 30), np.float32)
    for row, n in enumerate(lengths):
        weights[row, :n] = rng.random(n, dtype=np.float32) * 10.0 ** rng.uniform(-3, 1, n)  # TF-IDF-like spread
    weights[3, 2:5] = 0.0
    ids = rng.integers(0, 4096, weights.shape)
    ids[1, 0] = 5  # the all-zero row
    feeds = {"ids": ids, "weights": weights}
    expected = ort.InferenceSession(whole.SerializeToString(), providers=["CPUExecutionProvider"]).run(["out"], feeds)
    got = ort.InferenceSession(stored.SerializeToString(), providers=["CPUExecutionProvider"]).run(["out"], feeds)
    # the graph's weights are w · the row's int8 scale; each is off by ≤ half a last digit of the row's largest
    q, scale = quantize_rows(table)
    scaled_weights = weights * scale[ids]
    digit = 255.0**-levels * scaled_weights.max(axis=1)  # [N]
    used = (weights != 0)[..., None]
    bound = 0.5 * digit[:, None] * (np.abs(q[ids].astype(np.float64)) * used).sum(axis=1)  # [N, D]
    float_noise = 1e-6 * (np.abs(weights[..., None] * table[ids])).sum(axis=1)
    assert np.all(np.abs(got[0] - expected[0]) <= bound + float_noise)
    assert np.all(got[0][2] == 0) and np.abs(expected[0]).max() > 0.1
    if levels == 3:
        np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=1e-5 * np.abs(expected[0]).max())


def test_integer_bags_need_int8_rows() -> None:
    rng = np.random.default_rng(8)
    table = rng.normal(0, 0.05, (4096, 16)).astype(np.float16).astype(np.float32)
    model = _weighted_bag_model(table)
    assert store_embeddings_as_float16(model) == 1
    with pytest.raises(ExportError, match="int8 rows"):
        chunk_bags(model, chunk=8, max_tokens=24, levels=2)
