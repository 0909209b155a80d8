"""Test helper: bundles whose featurizer is the real one (fitted on a few products), so a worker can load them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from schemas import ProductChange
from serving.featurizer import Featurizer, FeaturizerConfig
from tests.tinymodel import make_bundle

TITLES = [
    "华为 Mate 60 Pro 5G手机 黑色",
    "Turtle Check Men Navy Blue Shirt",
    "苹果 iPhone 15 128GB 蓝色",
    "Nike Women Red Running Shoes",
    "小米 充电宝 20000mAh",
    "Levis Men Black Jeans",
]


def featurized_bundle(registry: Path, *, seed: int = 0) -> Path:
    """A tiny random-weight ONNX bundle over the real featurizer (hash_bits=10, L=32); different seeds give
    different models with the same input and label layout."""
    products = [
        ProductChange("upsert", f"fit-{i}", 0, 0, title=t, brand="brand", price=10.0 + i)
        for i, t in enumerate(TITLES * 3)
    ]
    featurizer = Featurizer.fit(products, FeaturizerConfig(hash_bits=10, max_features=32, min_df=1))
    return make_bundle(
        registry,
        L=featurizer.max_features,
        K=featurizer.n_numeric,
        buckets=featurizer.n_buckets,
        featurizer_files=featurizer_files(featurizer),
        seed=seed,
    )


def featurizer_files(featurizer: Featurizer) -> dict[str, bytes]:
    """The bundle files of `featurizer` with an all-ones IDF (every fitted feature weighs by its count alone)."""
    files = {"featurizer.json": json.dumps(featurizer.spec, ensure_ascii=False).encode()}
    for name, array in (("idf.npy", np.ones(featurizer.n_buckets, np.float32)), ("known.npy", featurizer.known)):
        buf = io.BytesIO()
        np.save(buf, array)
        files[name] = buf.getvalue()
    return files
