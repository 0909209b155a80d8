"""Storing the embedding table as float16 in the exported ONNX model (no TensorFlow needed)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tagstream.errors import ExportError
from training.export import store_embeddings_as_float16


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
