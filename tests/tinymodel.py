"""Test helper: a tiny valid ONNX model and a full bundle (SPEC §2) built with onnx.helper, no TensorFlow.

    from tests.tinymodel import make_bundle, make_feature_batch
    bundle_dir = make_bundle(tmp_path / "registry")               # valid, validated, default labels (T=9)
    batch = make_feature_batch(8)                                   # ids/weights/numeric for L=16, K=2

The model: sum of the ids' embeddings weighted by `weights`, concatenated with `numeric`, one dense layer, then
softmax inside each exclusive group and sigmoid for each multi-label group, columns in label index order.
`tamper` replaces a file of a written bundle and (by default) rewrites the manifest so that only the change
itself is wrong, which is how the rejection tests isolate one reason.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from serving.bundle import VERSION_RE, write_bundle

__all__ = [
    "DEFAULT_LABELS",
    "DEFAULT_THRESHOLDS",
    "FeatureArrays",
    "make_bundle",
    "make_feature_batch",
    "make_featurizer_spec",
    "make_model",
    "rewrite_manifest",
    "run_model",
    "tamper",
]

DEFAULT_LABELS: dict[str, Any] = {
    "format_version": 1,
    "groups": [
        {"name": "category_l1", "kind": "exclusive", "parent_group": None},
        {"name": "category_l2", "kind": "exclusive", "parent_group": "category_l1"},
        {"name": "colour", "kind": "exclusive", "parent_group": None},
        {"name": "style", "kind": "multi", "parent_group": None},
    ],
    "labels": [
        {"index": 0, "tag": "category:手机通讯", "group": "category_l1", "value": "手机通讯", "parent": None},
        {"index": 1, "tag": "category:Clothing", "group": "category_l1", "value": "Clothing", "parent": None},
        {
            "index": 2,
            "tag": "category:手机通讯/手机",
            "group": "category_l2",
            "value": "手机",
            "parent": "category:手机通讯",
        },
        {
            "index": 3,
            "tag": "category:手机通讯/配件",
            "group": "category_l2",
            "value": "配件",
            "parent": "category:手机通讯",
        },
        {
            "index": 4,
            "tag": "category:Clothing/Shirts",
            "group": "category_l2",
            "value": "Shirts",
            "parent": "category:Clothing",
        },
        {"index": 5, "tag": "colour:Black", "group": "colour", "value": "Black", "parent": None},
        {"index": 6, "tag": "colour:Navy Blue", "group": "colour", "value": "Navy Blue", "parent": None},
        {"index": 7, "tag": "style:casual", "group": "style", "value": "casual", "parent": None},
        {"index": 8, "tag": "style:sport", "group": "style", "value": "sport", "parent": None},
    ],
}
DEFAULT_THRESHOLDS: dict[str, Any] = {"format_version": 1, "default": 0.5, "per_tag": {"style:sport": 0.4}}
FIXED_TIME = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


class FeatureArrays(NamedTuple):
    """A feature batch shaped like the featurizer's FeatureBatch."""

    ids: np.ndarray  # int64 [N, L]
    weights: np.ndarray  # float32 [N, L]
    numeric: np.ndarray  # float32 [N, K]


def make_feature_batch(n: int, *, L: int = 16, K: int = 2, buckets: int = 64, seed: int = 1) -> FeatureArrays:
    """`n` random rows with ids in [0, buckets) and a few zero-weight padding slots."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, buckets, size=(n, L), dtype=np.int64)
    weights = rng.uniform(0.0, 1.0, size=(n, L)).astype(np.float32)
    weights[:, L - max(1, L // 4) :] = 0.0
    numeric = rng.normal(size=(n, K)).astype(np.float32)
    return FeatureArrays(ids, weights, numeric)


def make_featurizer_spec(*, L: int = 16, K: int = 2, buckets: int = 64) -> dict[str, Any]:
    """A minimal featurizer.json: only `max_features` (L) and `numeric` (K entries) matter to bundle checks."""
    return {
        "version": "tiny-1",
        "hashing": {"buckets": buckets, "seed": 0},
        "max_features": L,
        "numeric": [{"name": f"num{i}", "mean": 0.0, "std": 1.0} for i in range(K)],
        "assets": {"idf": "idf.npy"},
    }


def make_model(
    *,
    labels: Mapping[str, Any] = DEFAULT_LABELS,
    L: int = 16,
    K: int = 2,
    buckets: int = 64,
    dim: int = 8,
    opset: int = 17,
    seed: int = 0,
    poison: Literal["nan", "inf"] | None = None,
    token_dim: int | str | None = None,
) -> onnx.ModelProto:
    """The tiny scoring model for `labels`; `poison` adds Log(-1) (NaN) or 1/0 (inf) to every score; `token_dim`
    declares the token axis of ids/weights (default L; a name makes it dynamic)."""
    rng = np.random.default_rng(seed)
    groups = labels["groups"]
    labs = sorted(labels["labels"], key=lambda x: x["index"])
    T = len(labs)
    inits = [
        numpy_helper.from_array(rng.normal(0, 1.0, size=(buckets, dim)).astype(np.float32), "emb"),
        numpy_helper.from_array(rng.normal(0, 0.7, size=(dim + K, T)).astype(np.float32), "dense_w"),
        numpy_helper.from_array(rng.normal(0, 0.3, size=(T,)).astype(np.float32), "dense_b"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["tok"], axis=0),
        helper.make_node("Unsqueeze", ["weights", "axis2"], ["w3"]),
        helper.make_node("Mul", ["tok", "w3"], ["weighted"]),
        helper.make_node("ReduceSum", ["weighted", "axis1"], ["pooled"], keepdims=0),
        helper.make_node("Concat", ["pooled", "numeric"], ["feat"], axis=1),
        helper.make_node("MatMul", ["feat", "dense_w"], ["mm"]),
        helper.make_node("Add", ["mm", "dense_b"], ["logits"]),
    ]
    order: list[int] = []
    parts: list[str] = []
    for g in groups:
        cols = [x["index"] for x in labs if x["group"] == g["name"]]
        if not cols:
            continue
        name = g["name"]
        inits.append(numpy_helper.from_array(np.array(cols, dtype=np.int64), f"cols_{name}"))
        nodes.append(helper.make_node("Gather", ["logits", f"cols_{name}"], [f"logit_{name}"], axis=1))
        act = "Softmax" if g["kind"] == "exclusive" else "Sigmoid"
        kwargs = {"axis": -1} if act == "Softmax" else {}
        nodes.append(helper.make_node(act, [f"logit_{name}"], [f"prob_{name}"], **kwargs))
        order.extend(cols)
        parts.append(f"prob_{name}")
    inverse = np.argsort(np.array(order, dtype=np.int64)).astype(np.int64)
    inits.append(numpy_helper.from_array(inverse, "inverse"))
    nodes.append(helper.make_node("Concat", parts, ["grouped"], axis=1))
    out = "scores" if poison is None else "clean"
    nodes.append(helper.make_node("Gather", ["grouped", "inverse"], [out], axis=1))
    if poison == "nan":
        inits.append(numpy_helper.from_array(np.array([-1.0], dtype=np.float32), "minus_one"))
        nodes.append(helper.make_node("Log", ["minus_one"], ["bad"]))
        nodes.append(helper.make_node("Add", ["clean", "bad"], ["scores"]))
    elif poison == "inf":
        inits.append(numpy_helper.from_array(np.array([0.0], dtype=np.float32), "zero"))
        inits.append(numpy_helper.from_array(np.array([1.0], dtype=np.float32), "one"))
        nodes.append(helper.make_node("Div", ["one", "zero"], ["bad"]))
        nodes.append(helper.make_node("Add", ["clean", "bad"], ["scores"]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        inputs=[
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", L if token_dim is None else token_dim]),
            helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["N", L if token_dim is None else token_dim]),
            helper.make_tensor_value_info("numeric", TensorProto.FLOAT, ["N", K]),
        ],
        outputs=[helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", T])],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets), producer_name="tinymodel"
    )
    return model


def run_model(model: onnx.ModelProto | bytes, batch: FeatureArrays) -> np.ndarray:
    """Score `batch` with a plain ONNX Runtime session (the reference for golden rows)."""
    data = model if isinstance(model, bytes) else model.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    feeds = {"ids": batch.ids, "weights": batch.weights, "numeric": batch.numeric}
    return np.asarray(sess.run(["scores"], feeds)[0], dtype=np.float32)


def make_bundle(
    registry_dir: str | Path,
    *,
    labels: Mapping[str, Any] = DEFAULT_LABELS,
    thresholds: Mapping[str, Any] = DEFAULT_THRESHOLDS,
    L: int = 16,
    K: int = 2,
    buckets: int = 64,
    model: onnx.ModelProto | bytes | None = None,
    opset: int = 17,
    seed: int = 0,
    golden_rows: int = 64,
    golden_scores: np.ndarray | None = None,
    featurizer_spec: Mapping[str, Any] | None = None,
    featurizer_files: Mapping[str, bytes] | Callable[[Path], Any] | None = None,
    signing_key: Ed25519PrivateKey | None = None,
    created_at: datetime = FIXED_TIME,
    model_name: str = "tiny",
    validate: bool = True,
    golden_features: Any = None,
    golden_inputs: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write a complete bundle into `registry_dir` and return its directory.

    `model` defaults to `make_model(...)` with the same labels/L/K/buckets/opset/seed. Golden scores are computed
    with ONNX Runtime unless `golden_scores` is given (needed for models that cannot run or return NaN).
    `featurizer_spec` replaces the minimal featurizer.json (written with an all-ones idf.npy); `featurizer_files`
    replaces both and is passed to write_bundle as is (e.g. a real `Featurizer(...).save`, whose L/K/buckets must
    then be the ones given here). The minimal featurizer.json is NOT loadable by `Featurizer.load`.
    `validate=False` writes without validating (for deliberately broken bundles). `golden_features` (a FeatureBatch)
    replaces the random golden rows, `golden_inputs` are the products they were featurized from (golden.npz `inputs`).
    """
    if model is None:
        model = make_model(labels=labels, L=L, K=K, buckets=buckets, opset=opset, seed=seed)
    onnx_bytes = model if isinstance(model, bytes) else model.SerializeToString()
    golden_in = golden_features
    if golden_in is None:
        golden_in = make_feature_batch(golden_rows, L=L, K=K, buckets=buckets, seed=seed + 100)
    scores = run_model(onnx_bytes, golden_in) if golden_scores is None else golden_scores
    if featurizer_files is None:
        spec = dict(featurizer_spec) if featurizer_spec is not None else make_featurizer_spec(L=L, K=K, buckets=buckets)
        buf = io.BytesIO()
        np.save(buf, np.ones(buckets, dtype=np.float32))
        featurizer_files = {
            "featurizer.json": json.dumps(spec, ensure_ascii=False).encode(),
            "idf.npy": buf.getvalue(),
        }
    return write_bundle(
        registry_dir,
        onnx_bytes=onnx_bytes,
        labels=labels,
        thresholds=thresholds,
        featurizer_files=featurizer_files,
        metrics={"format_version": 1, "model": {"micro_f1": 0.5}, "baseline": {"micro_f1": 0.3}},
        golden={
            "ids": golden_in.ids,
            "weights": golden_in.weights,
            "numeric": golden_in.numeric,
            "scores": scores,
            **({"inputs": golden_inputs} if golden_inputs is not None else {}),
        },
        meta={"model_name": model_name, "training_data_sha256": "0" * 64},
        signing_key=signing_key,
        created_at=created_at,
        validate=validate,
    )


def rewrite_manifest(
    bundle_dir: Path,
    *,
    mutate: Callable[[dict[str, Any]], None] | None = None,
    signing_key: Ed25519PrivateKey | None = None,
    fix_checksums: bool = True,
) -> None:
    """Recompute the manifest's file checksums (and model_version suffix), apply `mutate`, re-sign if a key is
    given (else drop any signature)."""
    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_bytes())
    if fix_checksums:
        manifest["files"] = {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(bundle_dir.iterdir())
            if p.is_file() and not p.name.startswith("manifest")
        }
        m = VERSION_RE.match(manifest.get("model_version", ""))
        if m and "model.onnx" in manifest["files"]:
            manifest["model_version"] = f"{m.group(1)}-{manifest['files']['model.onnx'][:8]}"
    if mutate is not None:
        mutate(manifest)
    data = (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    _overwrite(path, data)
    sig = bundle_dir / "manifest.sig"
    if signing_key is not None:
        _overwrite(sig, base64.b64encode(signing_key.sign(data)))
    elif sig.exists():
        sig.unlink()


def tamper(
    bundle_dir: Path,
    name: str,
    data: bytes,
    *,
    fix_manifest: bool = True,
    signing_key: Ed25519PrivateKey | None = None,
) -> None:
    """Replace (or add) file `name` of a written bundle; by default rewrite the manifest to match it."""
    _overwrite(bundle_dir / name, data)
    if fix_manifest:
        rewrite_manifest(bundle_dir, signing_key=signing_key)


def _overwrite(path: Path, data: bytes) -> None:
    if path.exists():
        path.chmod(0o644)  # bundles are written read-only
    path.write_bytes(data)
