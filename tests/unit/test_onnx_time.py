"""bench.onnx_time: ONNX Runtime's kernel time by operator, and the int8-dense variant's speed and parity."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bench.onnx_time import int8_dense, operator_times, quantized_dense
from bench.report import _onnx_time_lines
from tests.tinymodel import make_feature_batch, make_model
from training.export import PARITY_ATOL


def _bytes(dim: int = 64) -> bytes:
    return make_model(dim=dim, seed=3).SerializeToString()


def _feed(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    b = make_feature_batch(n, seed=seed)
    return {"ids": b.ids, "weights": b.weights, "numeric": b.numeric}


def _scores(data: bytes, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_operator_times_split_every_call_by_the_graphs_own_operators() -> None:
    model = _bytes()
    ops = operator_times(model, _feed(32), calls=20, top=3)
    graph_ops = {n.op_type for n in onnx.load_from_string(model).graph.node}
    assert ops["rows"] == 32 and ops["calls"] == 20
    names = [o["op"] for o in ops["by_op"]]
    assert "Gather" in names and len(names) == len(set(names))
    # ORT may fuse (MatMul + Add -> Gemm), but never invents work outside the graph's kinds of computation
    assert set(names) - graph_ops <= {"Gemm", "FusedGemm", "FusedMatMul"}
    assert sum(o["share"] for o in ops["by_op"]) == pytest.approx(1.0)
    assert sum(o["us_per_call"] for o in ops["by_op"]) == pytest.approx(ops["kernel_us_per_call"])
    us = [o["us_per_call"] for o in ops["by_op"]]
    assert us == sorted(us, reverse=True) and us[0] > 0
    assert len(ops["top_nodes"]) == 3 and ops["top_nodes"][0]["us_per_call"] == pytest.approx(
        max(n["us_per_call"] for n in ops["top_nodes"])
    )
    assert sum(o["nodes"] for o in ops["by_op"]) == ops["nodes"]
    with pytest.raises(ValueError, match="calls"):
        operator_times(model, _feed(4), calls=0)


def test_int8_variant_is_measured_against_the_float_model_with_the_gates_two_measures() -> None:
    model = _bytes()
    check = _feed(500, seed=7)
    ref = _scores(model, check)
    # thresholds in the middle of the float scores: where quantization noise can flip a decision
    thresholds = np.median(ref, axis=0)
    got = int8_dense(model, _feed(64), check, thresholds, runs=2, min_seconds=0.02)
    q = _scores(quantized_dense(model), check)
    assert got["int8_matmuls"] == 1  # the tiny model's one dense layer
    assert got["checked_rows"] == 500 and got["rows"] == 64
    assert got["max_abs_diff"] == pytest.approx(float(np.abs(q - ref).max()))
    assert got["max_abs_diff"] > 0  # int8 weights do move the scores
    assert got["decision_flips"] == int(np.sum((q >= thresholds) != (ref >= thresholds)))
    assert got["passes_parity_gate"] is (got["max_abs_diff"] <= PARITY_ATOL and got["decision_flips"] == 0)
    assert got["float_rows_per_s"]["median"] > 0 and got["int8_rows_per_s"]["median"] > 0
    assert len(got["int8_rows_per_s"]["runs"]) == 2
    assert got["speedup"] == pytest.approx(got["int8_rows_per_s"]["median"] / got["float_rows_per_s"]["median"])
    # thresholds of 0 cannot flip (every score >= 0): the verdict is the score difference alone
    none = int8_dense(model, _feed(8), check, np.zeros(ref.shape[1]), runs=1, min_seconds=0.01)
    assert none["decision_flips"] == 0
    with pytest.raises(ValueError, match="thresholds"):
        int8_dense(model, _feed(8), check, np.zeros(ref.shape[1] + 1), runs=1, min_seconds=0.01)


def test_report_shows_the_operator_table_and_the_int8_verdict() -> None:
    model = _bytes()
    feed = _feed(16)
    ops = operator_times(model, feed, calls=5)
    ref = _scores(model, feed)
    q = int8_dense(model, feed, feed, np.median(ref, axis=0), runs=1, min_seconds=0.01)
    text = "\n".join(_onnx_time_lines({"operators": ops, "int8_dense": q}, ops_shown=2))
    assert "kernel time per call of 16 rows" in text
    assert f"| {ops['by_op'][0]['op']} |" in text
    assert f"| {len(ops['by_op']) - 2} others |" in text
    verdict = "passes" if q["passes_parity_gate"] else "fails"
    assert f"{q['decision_flips']} decision flips: {verdict} the export parity gate" in text
    assert _onnx_time_lines({}) == []
    failed = "\n".join(_onnx_time_lines({"int8_dense": {"error": "ValueError: no MatMul"}}))
    assert "int8 dense layers: not measured (ValueError: no MatMul)." in failed
