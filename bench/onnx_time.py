"""Where one ONNX Runtime call's time goes, and what integer dense layers would change (for `bench/scoring.py`).

- `operator_times`: ONNX Runtime's own profiler over repeated calls of one batch on one thread: kernel time per
  call by operator type and by node, so a missed rows/s target says which part of the graph to change (the bag's
  gathers, the dense matrix products, or the small shape operators between them).
- `int8_dense`: the same model with the weights of its matrix products quantized to int8 (ONNX Runtime's
  `quantize_dynamic`, activations quantized per call), timed against the float model with the same calls
  (alternated), and checked with the parity gate's two measures (max |Δ| of the scores and decision flips at the
  shipped thresholds) against the float model. tagstream ships float dense layers because such a model fails that
  gate; this is the figure that says what the gate costs in rows/s.

Neither needs TensorFlow.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.common import spread, timed_repeat
from serving.scorer import OnnxScorer
from training.export import PARITY_ATOL, parity_measures  # the export gate's (TensorFlow is imported lazily)

__all__ = ["int8_dense", "operator_times", "quantized_dense"]


def _options(profile_dir: str | None = None) -> ort.SessionOptions:
    """The worker's scorer options with one intra-op and one inter-op thread (per-core figures), profiling into
    `profile_dir` when given."""
    so = OnnxScorer(intra_op_num_threads=1, inter_op_num_threads=1).session_options()
    if profile_dir is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(profile_dir) / "ort")
    return so


def _session(onnx_bytes: bytes, profile_dir: str | None = None) -> ort.InferenceSession:
    return ort.InferenceSession(onnx_bytes, _options(profile_dir), providers=["CPUExecutionProvider"])


def operator_times(
    onnx_bytes: bytes, feed: Mapping[str, np.ndarray], *, calls: int = 200, top: int = 12
) -> dict[str, Any]:
    """Kernel time per call of `feed` by operator type (largest first, with its share of all kernel time) and the
    `top` slowest nodes, from ONNX Runtime's profiler over `calls` calls (the first one, which sizes the arena,
    included)."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    rows = len(next(iter(feed.values())))
    with tempfile.TemporaryDirectory(prefix="tagstream-ort-profile-") as tmp:
        sess = _session(onnx_bytes, tmp)
        for _ in range(calls):
            sess.run(None, dict(feed))
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    by_node: dict[str, float] = defaultdict(float)
    op_of: dict[str, str] = {}
    runs = 0
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            runs += 1
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        node = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "?")
        by_op[op] += e["dur"]
        by_node[node] += e["dur"]
        op_of[node] = op
    runs = runs or calls
    nodes_of = Counter(op_of.values())
    total = sum(by_op.values())
    if not total:
        raise RuntimeError("ONNX Runtime's profile holds no kernel times")
    return {
        "rows": rows,
        "calls": runs,
        "nodes": len(by_node),
        "kernel_us_per_call": total / runs,
        "by_op": [
            {"op": op, "us_per_call": us / runs, "share": us / total, "nodes": nodes_of[op]}
            for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])
        ],
        "top_nodes": [
            {"node": node, "op": op_of[node], "us_per_call": us / runs, "share": us / total}
            for node, us in sorted(by_node.items(), key=lambda kv: -kv[1])[:top]
        ],
    }


def quantized_dense(onnx_bytes: bytes) -> bytes:
    """The model with the int8 weights of every MatMul whose weights are constants (activations quantized per call,
    `quantize_dynamic`); ONNX Runtime fuses them into integer matrix products."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="tagstream-int8-") as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_bytes)
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
        return dst.read_bytes()


def int8_dense(
    onnx_bytes: bytes,
    feed: Mapping[str, np.ndarray],
    check_feed: Mapping[str, np.ndarray],
    thresholds: np.ndarray,
    *,
    runs: int = 3,
    min_seconds: float = 0.3,
) -> dict[str, Any]:
    """Rows/s of the float model and of its int8-dense variant on `feed` (one call per measurement, the two
    alternated `runs` times), and the variant's max |Δ| and decision flips against the float model on
    `check_feed` at `thresholds` (one per score column), i.e. whether it would pass the export parity gate."""
    q_bytes = quantized_dense(onnx_bytes)
    sessions = {"float": _session(onnx_bytes), "int8": _session(q_bytes)}
    rows = len(next(iter(feed.values())))
    ref = sessions["float"].run(None, dict(check_feed))[0]
    got = sessions["int8"].run(None, dict(check_feed))[0]
    if np.size(thresholds) != ref.shape[1]:
        raise ValueError(f"{np.size(thresholds)} thresholds for {ref.shape[1]} score columns")
    diff, flips = parity_measures(got, ref, thresholds)
    ms: dict[str, list[float]] = {name: [] for name in sessions}
    for sess in sessions.values():  # warm up (arena, kernels)
        sess.run(None, dict(feed))
    for _ in range(runs):
        for name, sess in sessions.items():
            ms[name].append(timed_repeat(lambda sess=sess: sess.run(None, dict(feed)), min_seconds) * 1000)
    rate = {name: spread(rows / (m / 1000) for m in values) for name, values in ms.items()}
    return {
        "rows": rows,
        "float_rows_per_s": rate["float"],
        "int8_rows_per_s": rate["int8"],
        "speedup": rate["int8"]["median"] / rate["float"]["median"],
        "checked_rows": int(ref.shape[0]),
        "max_abs_diff": diff,
        "decision_flips": flips,
        "passes_parity_gate": diff <= PARITY_ATOL and flips == 0,
        "int8_matmuls": _count_integer_products(q_bytes) - _count_integer_products(onnx_bytes),
    }


def _count_integer_products(onnx_bytes: bytes) -> int:
    """Matrix products the quantizer turned into integer ones."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    return sum(1 for n in model.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"))
