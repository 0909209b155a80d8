"""How often near-identical titles carry different labels: a floor under any text model's error on a catalog.

    python -m bench.near_duplicates [--data ../shared/data] [--catalog cn-jd|myntra] [--label leaf|colour|usage]
                                    [--seed 0]

The split is `bench/quality.py`'s (stratified 75/5/20, the same seed). Every test title gets its nearest training
title by cosine similarity of character 1–3-gram TF-IDF vectors (exact duplicate titles are already removed by the
loader). For the test titles whose neighbour is at least 0.8 / 0.9 / 0.95 similar, it prints how often the two
labels differ, and the accuracy of the 1-nearest-neighbour label over all test titles. For an attribute, also how
many test titles spell out their value, overall and for the labels with at most 12 test products (those weigh as
much as any other in macro F1). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FILES = {"cn-jd": "cn-products-jd/products.csv", "myntra": "fashion-myntra-styles/styles.csv.zip"}
THRESHOLDS = (0.8, 0.9, 0.95)


def label_of(product: Any, label: str) -> str | None:
    """The product's leaf category or one of its attributes."""
    if label == "leaf":
        return "|".join(product.category_path) or None
    return product.attributes.get(label)


def near_duplicates(data: Path, catalog: str, label: str, seed: int) -> dict[str, Any]:
    """Nearest-training-title label agreement on the quality benchmark's test split."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from training.loaders import load_catalog
    from training.splits import stratified_split

    products = [p for p in load_catalog(data / FILES[catalog], catalog).products if label_of(p, label)]
    split = stratified_split(products, validation=0.05, test=0.2, seed=seed)
    train, test = list(split.train), list(split.test)
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=2)
    x_train = vectorizer.fit_transform([p.title for p in train])
    x_test = vectorizer.transform([p.title for p in test])
    nearest = np.zeros(len(test), dtype=np.int64)
    similarity = np.zeros(len(test))
    for start in range(0, len(test), 500):
        block = (x_test[start : start + 500] @ x_train.T).toarray()
        nearest[start : start + 500] = block.argmax(axis=1)
        similarity[start : start + 500] = block.max(axis=1)
    same = np.array([label_of(train[j], label) == label_of(p, label) for j, p in zip(nearest, test, strict=True)])
    named = np.array([str(label_of(p, label)).lower() in p.title.lower() for p in test])
    counts: dict[str, int] = {}
    for p in test:
        counts[str(label_of(p, label))] = counts.get(str(label_of(p, label)), 0) + 1
    rare = {v for v, n in counts.items() if n <= 12}
    rare_named = [bool(n) for p, n in zip(test, named, strict=True) if str(label_of(p, label)) in rare]
    return {
        "catalog": catalog,
        "label": label,
        "train": len(train),
        "test": len(test),
        "nearest_neighbour_accuracy": round(float(same.mean()), 4),
        # attributes: does the title spell out the label's value (case-insensitive)?
        "named_in_title": None if label == "leaf" else round(float(named.mean()), 4),
        "named_in_title_rare_labels": None
        if label == "leaf" or not rare_named
        else round(float(np.mean(rare_named)), 4),
        "rare_labels": len(rare),
        "near": {
            str(t): {
                "share_of_test": round(float((similarity >= t).mean()), 4),
                "labels_differ": round(float(1 - same[similarity >= t].mean()), 4) if (similarity >= t).any() else None,
            }
            for t in THRESHOLDS
        },
    }


def main(argv: list[str] | None = None) -> int:
    """CLI."""
    sys.path.insert(0, str(ROOT))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--catalog", choices=sorted(FILES), default="cn-jd")
    p.add_argument("--label", default="leaf", help="leaf, or an attribute name (colour, usage, ...)")
    p.add_argument("--seed", type=int, default=0, help="split seed (bench/quality.py's --seed)")
    args = p.parse_args(argv)
    sys.stdout.write(json.dumps(near_duplicates(args.data, args.catalog, args.label, args.seed)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
