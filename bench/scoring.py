"""Scoring alone: ONNX Runtime (the worker's scorer) against Keras `model(x)` and `model.predict`, same model, same
inputs, at batch 1, 8, 64 and 512; plus the worker's whole scoring step (featurize + ONNX + decode tags).

    python -m bench.scoring --bundle DIR --keras FILE --runs 3 [--min-seconds 0.3] [--batches 1,8,64,512]

Both engines get one intra-op thread (the worker's `TAGSTREAM_ORT_INTRA_OP_THREADS` default), so rows/s are per core.
Inputs are real catalog titles (Chinese and English mixed) featurized by the bundle's featurizer. Each figure is the
median over `--runs` runs of (time per call, repeated for at least `--min-seconds`). Prints one JSON line.

Also, at `--profile-batch` rows (64, the rows/s target's batch): ONNX Runtime's kernel time by operator and node,
and the model with int8 dense layers (`bench.onnx_time`): its rows/s beside the float model's and, on
`--check-rows` other titles, its max |Δ| and decision flips, i.e. whether it would pass the export parity gate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from bench.common import SHARED_DATA, load_products, spread, timed_repeat


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every engine at every batch size."""
    from bench.naive import load_keras
    from serving.bundle import load_bundle
    from serving.scorer import OnnxScorer
    from streams.model import BundleModel

    bundle = load_bundle(args.bundle)
    # one session.run per measured batch, whatever its size (the worker's default splits runs at 64 rows)
    scorer = OnnxScorer(intra_op_num_threads=1, inter_op_num_threads=1, max_rows_per_run=4096)
    scorer.load(bundle)
    pipeline = BundleModel(bundle, scorer)
    t0 = time.perf_counter()
    model = load_keras(args.keras, threads=1)
    keras_load_s = time.perf_counter() - t0
    batches = [int(b) for b in args.batches.split(",")]
    products, catalog = load_products(max(batches), args.seed, None if args.synthetic else SHARED_DATA)
    feats = bundle.featurizer.transform(products)

    onnx_scores = scorer.predict(feats)
    keras_scores = np.asarray(model(feats.as_inputs(), training=False))
    parity = float(np.abs(onnx_scores - keras_scores).max())

    results: dict[str, Any] = {}
    for bs in batches:
        x = feats.take(slice(0, bs))
        inputs = x.as_inputs()
        items = products[:bs]
        scores = scorer.predict(x)
        engines = {
            "onnx": lambda x=x: scorer.predict(x),
            "keras_call": lambda inputs=inputs: np.asarray(model(inputs, training=False)),
            "keras_predict": lambda inputs=inputs, bs=bs: model.predict(inputs, batch_size=bs, verbose=0),
            "pipeline_onnx": lambda items=items: pipeline.score(items),
            # the worker's scoring step's other two parts, to say where its time goes beside ONNX Runtime's
            "featurize": lambda items=items: bundle.featurizer.transform(items),
            "decode": lambda scores=scores: pipeline.decoder.decode(scores),
        }
        for fn in engines.values():  # warm up (graph tracing of predict, ORT arena)
            fn()
            fn()
        per_engine = {}
        for name, fn in engines.items():
            ms = [timed_repeat(fn, args.min_seconds) * 1000 for _ in range(args.runs)]
            s = spread(ms)
            per_engine[name] = {
                "ms_per_call": s,
                "rows_per_s": bs / (s["median"] / 1000),
            }
        per_engine["speedup_vs_keras_call"] = (
            per_engine["keras_call"]["ms_per_call"]["median"] / per_engine["onnx"]["ms_per_call"]["median"]
        )
        per_engine["speedup_vs_keras_predict"] = (
            per_engine["keras_predict"]["ms_per_call"]["median"] / per_engine["onnx"]["ms_per_call"]["median"]
        )
        per_engine["speedup_runs_vs_keras_call"] = [
            round(k / o, 2)
            for k, o in zip(
                per_engine["keras_call"]["ms_per_call"]["runs"], per_engine["onnx"]["ms_per_call"]["runs"], strict=True
            )
        ]
        results[str(bs)] = per_engine
    # where a call's time goes at the target's batch size, and what int8 dense layers would score at (bench.onnx_time)
    from bench.onnx_time import int8_dense, operator_times
    from training.export import threshold_vector

    x = feats.take(slice(0, min(args.profile_batch, len(products))))
    feed = _scorer_feed(x, scorer.trims_padding)
    check_products, _ = load_products(args.check_rows, args.seed + 1, None if args.synthetic else SHARED_DATA)
    check = bundle.featurizer.transform(check_products)
    check_feed = _scorer_feed(check, scorer.trims_padding)
    thresholds = threshold_vector([lab.tag for lab in bundle.labels.labels], bundle.thresholds.to_json())
    operators = operator_times(bundle.onnx_bytes, feed)
    try:  # a what-if beside the figures above: a model the quantizer cannot rewrite loses only this part
        int8 = int8_dense(bundle.onnx_bytes, feed, check_feed, thresholds, runs=args.runs, min_seconds=args.min_seconds)
    except Exception as exc:
        int8 = {"error": f"{type(exc).__name__}: {exc}"}
    return {
        "batches": results,
        "operators": operators,
        "int8_dense": int8,
        "threads": {"onnx_intra_op": 1, "tf_intra_op": 1, "tf_inter_op": 1},
        "max_abs_diff_onnx_vs_keras": parity,
        "rows": len(products),
        "inputs": catalog,
        "model": {"L": bundle.L, "K": bundle.K, "T": bundle.T, "onnx_bytes": len(bundle.onnx_bytes)},
        "keras_load_s": round(keras_load_s, 2),
    }


def _scorer_feed(batch: Any, trim: bool) -> dict[str, Any]:
    """A FeatureBatch as the worker's scorer feeds it: with `trim` (a dynamic token axis), without the trailing
    token columns no row uses."""
    from serving.scorer import trim_padding

    ids, weights = trim_padding(batch.ids, batch.weights) if trim else (batch.ids, batch.weights)
    return {"ids": ids, "weights": weights, "numeric": batch.numeric}


def main(argv: list[str] | None = None) -> int:
    """CLI."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bundle", required=True)
    p.add_argument("--keras", required=True)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=0.3)
    p.add_argument("--batches", default="1,8,64,512")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--profile-batch", type=int, default=64, help="rows per call for the operator profile and int8")
    p.add_argument("--check-rows", type=int, default=2000, help="rows for the int8 variant's parity measures")
    p.add_argument("--synthetic", action="store_true")
    args = p.parse_args(argv)
    sys.stdout.write("RESULT " + json.dumps(run(args)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
