"""Train the model the benchmarks use, once, and cache it (bundle + the Keras scoring model) under a directory.

    python -m bench.model_cache --cache DIR --products 6000 --seed 7 [--set embed_dim=128 ...] [--smoke]

Runs in its own process (it imports TensorFlow). Writes DIR/model.json: {"key", "bundle", "keras", "train_s",
"settings", "onnx_bytes", "labels", "catalog"}. A cache whose key (catalog + settings) matches is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench.common import SHARED_DATA, load_products

# The bench model: the production architecture (TrainerSettings defaults: hash buckets, L, embedding, hidden layers,
# heads), trained for few epochs (speed and memory do not depend on them). `--set key=value` overrides.
BENCH_MODEL = {"epochs": 3, "baseline": False}
SMOKE_MODEL = {
    "hash_bits": 14,
    "embed_dim": 16,
    "hidden": (32,),
    "epochs": 1,
    "batch_size": 128,
    "min_support": 2,
    "parity_samples": 64,
    "baseline": False,
}


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """`key=value` overrides; values parsed as JSON when they can be (numbers, lists), else kept as strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = tuple(value) if isinstance(value, list) else value
    return out


# What the cached Keras model is: the scoring model with the tables the bundle ships (rounded to float16 or int8 rows),
# so the bench compares ONNX with the same model. A change here retrains cached models.
KERAS_SAVED = "shipped-tables"


# The sources that decide what the cached bundle's graph is: a change to the model or the ONNX rewrites retrains.
MODEL_SOURCES = ("training/model.py", "training/export.py")


def cache_key(catalog: str, n: int, seed: int, settings: dict[str, Any]) -> str:
    """Identity of a cached model: the catalog, the training settings and the model and export code."""
    root = Path(__file__).resolve().parents[1]
    code = hashlib.sha256(b"".join((root / name).read_bytes() for name in MODEL_SOURCES)).hexdigest()[:16]
    blob = json.dumps(
        {"catalog": catalog, "n": n, "seed": seed, "settings": settings, "keras": KERAS_SAVED, "code": code},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_model(cache: Path, n_products: int, seed: int, overrides: dict[str, Any], data_dir: Path | None) -> dict:
    """The cached model info, training it first when the cache does not hold this catalog + settings."""
    from training.settings import TrainerSettings

    products, catalog = load_products(n_products, seed, data_dir)
    settings = TrainerSettings(**overrides)
    # the resolved settings (defaults included): a change of the trainer's defaults retrains
    resolved = json.loads(settings.model_dump_json(exclude={"signing_key_path", "model_registry"}))
    key = cache_key(catalog, n_products, seed, resolved)
    info_path = cache / "model.json"
    if info_path.is_file():
        info = orjson.loads(info_path.read_bytes())
        if info.get("key") == key and Path(info["bundle"]).is_dir() and Path(info["keras"]).is_file():
            info["cached"] = True
            return info
    if cache.exists():
        shutil.rmtree(cache / "registry", ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)

    from training.train import train

    keras_path = cache / "scores.keras"
    fit_s: dict[str, float] = {}
    t0 = time.perf_counter()

    def on_fit(result: Any) -> None:
        fit_s["fit"] = time.perf_counter() - t0
        result.models.scores.save(keras_path)  # `train` has rounded its tables to the shipped values

    bundle = train(products, settings, registry=cache / "registry", progress=False, on_fit=on_fit)
    info = {
        "key": key,
        "bundle": str(bundle),
        "keras": str(keras_path),
        "train_s": round(time.perf_counter() - t0, 1),
        "fit_s": round(fit_s.get("fit", 0.0), 1),
        "settings": json.loads(settings.model_dump_json(exclude={"signing_key_path"})),
        "onnx_bytes": (bundle / "model.onnx").stat().st_size,
        "labels": len(orjson.loads((bundle / "labels.json").read_bytes())["labels"]),
        "catalog": catalog,
        "n_products": len(products),
        "cached": False,
    }
    info_path.write_bytes(orjson.dumps(info, option=orjson.OPT_INDENT_2))
    return info


def main(argv: list[str] | None = None) -> int:
    """CLI: train or reuse; prints model.json."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cache", required=True)
    p.add_argument("--products", type=int, default=6000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--synthetic", action="store_true", help="generated catalog even when ../shared/data exists")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    overrides = {**(SMOKE_MODEL if args.smoke else BENCH_MODEL), **parse_sets(args.set)}
    from training.train import configure_tensorflow

    configure_tensorflow(int(overrides.get("threads", 2)))
    info = ensure_model(Path(args.cache), args.products, args.seed, overrides, None if args.synthetic else SHARED_DATA)
    sys.stdout.write(json.dumps(info) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
