"""Featurizer cost per title on the hot path (`Featurizer.transform`, numpy + Python), Chinese and English titles,
one title per call (a micro-batch holding one upsert) and 64 per call (a busy micro-batch).

    python -m bench.featurizer_cost --bundle DIR [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import SHARED_DATA, is_chinese, load_products, spread, timed_repeat


def featurizer_cost(
    bundle_dir: Path, *, runs: int = 3, n_titles: int = 256, min_seconds: float = 0.3, data_dir: Path | None = None
) -> dict[str, Any]:
    """µs per title for Chinese and English titles at batch 1 and batch 64 (median of `runs`)."""
    from serving.bundle import load_bundle

    featurizer = load_bundle(bundle_dir).featurizer
    products, catalog = load_products(4 * n_titles, seed=23, data_dir=data_dir)
    by_lang = {
        "zh": [p for p in products if is_chinese(p.title)][:n_titles],
        "en": [p for p in products if not is_chinese(p.title)][:n_titles],
    }
    out: dict[str, Any] = {"inputs": catalog}
    for lang, items in by_lang.items():
        if not items:
            out[lang] = None
            continue
        featurizer.transform(items[:64])
        one_at_a_time = []
        batched = []
        for _ in range(runs):
            counter = iter(range(10**9))
            per_call = timed_repeat(
                lambda items=items, counter=counter: featurizer.transform([items[next(counter) % len(items)]]),
                min_seconds,
            )
            one_at_a_time.append(per_call * 1e6)
            chunk = (items * (64 // len(items) + 1))[:64]
            batched.append(timed_repeat(lambda chunk=chunk: featurizer.transform(chunk), min_seconds) * 1e6 / 64)
        out[lang] = {
            "titles": len(items),
            "mean_title_chars": round(float(np.mean([len(p.title) for p in items])), 1),
            "us_per_title_batch1": spread(one_at_a_time),
            "us_per_title_batch64": spread(batched),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bundle", required=True)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    sys.stdout.write(json.dumps(featurizer_cost(Path(args.bundle), runs=args.runs, data_dir=SHARED_DATA)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
