"""Train/validation/test splits: stratified by leaf label (in-domain) and grouped by source (out-of-domain).

Both return a `Split` of index arrays into the product list (sorted, disjoint, covering every product) with the
products of each part at hand. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.catalog import CatalogProduct

__all__ = [
    "TRAINED_ON_KEY",
    "Split",
    "group_split",
    "holdout_split",
    "in_holdout",
    "leaf_label",
    "read_trained_on",
    "stratified_split",
    "title_digest",
    "trained_on_key",
    "trained_on_record",
]

# How a bundle's metrics.json names the products it trained on (`trained_on_record`): the first 8 bytes of
# `title_digest`, as big-endian unsigned integers.
TRAINED_ON_KEY = "sha256(normalised title)[:8]"


def leaf_label(p: CatalogProduct) -> str:
    """The full category path (unique leaf name), '' when the product has no category."""
    return "/".join(p.category_path)


def title_digest(p: CatalogProduct) -> bytes:
    """sha256 of the product's normalised title: the key of the fixed evaluation set of `train --every`
    (`training.publish.eval_holdout`) and of a bundle's record of its training products (`trained_on_record`). It is
    the loaders' duplicate key, so each kept product has its own; not the product id, which for cn-jd is a line
    number."""
    from training.cleaning import normalize_text

    return hashlib.sha256(normalize_text(p.title).encode()).digest()


def trained_on_record(products: Sequence[CatalogProduct]) -> dict[str, Any]:
    """The record a bundle keeps (metrics.json `trained_on`, covered by its manifest) of the products it trained on
    (train and validation: both shape the shipped weights): `{"key", "n", "hashes"}`, `hashes` the base64 of the
    sorted distinct 8-byte keys (`TRAINED_ON_KEY`; 8 bytes a product, ~0.6 MB of JSON for 50,000 products)."""
    keys = np.unique(np.array([trained_on_key(p) for p in products], dtype=np.uint64))
    hashes = base64.b64encode(keys.astype(">u8").tobytes()).decode()
    return {"key": TRAINED_ON_KEY, "n": len(keys), "hashes": hashes}


def read_trained_on(record: Any) -> frozenset[int] | None:
    """The keys of a `trained_on_record` (as read back from metrics.json); None when `record` is absent (a bundle
    written before tagstream kept one) or not such a record."""
    if not isinstance(record, Mapping) or record.get("key") != TRAINED_ON_KEY:
        return None
    if not isinstance(record.get("hashes"), str):
        return None
    try:
        raw = base64.b64decode(record["hashes"], validate=True)
    except ValueError:  # binascii.Error
        return None
    if len(raw) % 8:
        return None
    return frozenset(int(k) for k in np.frombuffer(raw, dtype=">u8"))


def trained_on_key(p: CatalogProduct) -> int:
    """A product's key in a `trained_on_record`."""
    return int.from_bytes(title_digest(p)[:8], "big")


@dataclass(frozen=True)
class Split:
    """Index arrays (into the product list given to the split function) of the three parts."""

    train_idx: np.ndarray
    validation_idx: np.ndarray
    test_idx: np.ndarray
    products: Sequence[CatalogProduct]

    @property
    def train(self) -> list[CatalogProduct]:
        """Training products."""
        return [self.products[i] for i in self.train_idx]

    @property
    def validation(self) -> list[CatalogProduct]:
        """Validation products (threshold tuning, early stopping)."""
        return [self.products[i] for i in self.validation_idx]

    @property
    def test(self) -> list[CatalogProduct]:
        """Held-out test products."""
        return [self.products[i] for i in self.test_idx]

    def sizes(self) -> dict[str, int]:
        """Row counts of the three parts."""
        return {"train": len(self.train_idx), "validation": len(self.validation_idx), "test": len(self.test_idx)}


def _split(n: int, parts: list[list[int]], products: Sequence[CatalogProduct]) -> Split:
    tr, va, te = (np.array(sorted(p), dtype=np.int64) for p in parts)
    assert len(tr) + len(va) + len(te) == n
    return Split(tr, va, te, products)


def stratified_split(
    products: Sequence[CatalogProduct],
    *,
    validation: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    label: Callable[[CatalogProduct], str] = leaf_label,
    min_count: int = 3,
) -> Split:
    """Split each label's rows by the given fractions (rounded, at least one row per non-empty fraction).

    Labels with fewer than `min_count` rows go entirely to train (they cannot be both learnt and measured);
    the train part always keeps at least one row of each label.
    """
    if validation < 0 or test < 0 or validation + test >= 1:
        raise ValueError(f"bad fractions: validation={validation}, test={test}")
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, p in enumerate(products):
        by_label.setdefault(label(p), []).append(i)
    parts: list[list[int]] = [[], [], []]
    for key in sorted(by_label):
        idx = np.array(by_label[key])
        rng.shuffle(idx)
        n = len(idx)
        if n < min_count:
            parts[0].extend(idx.tolist())
            continue
        n_te = max(1, round(n * test)) if test > 0 else 0
        n_va = max(1, round(n * validation)) if validation > 0 else 0
        while n_te + n_va > n - 1:  # keep one for train
            if n_va >= n_te and n_va > 0:
                n_va -= 1
            else:
                n_te -= 1
        parts[2].extend(idx[:n_te].tolist())
        parts[1].extend(idx[n_te : n_te + n_va].tolist())
        parts[0].extend(idx[n_te + n_va :].tolist())
    return _split(len(products), parts, products)


def in_holdout(products: Sequence[CatalogProduct], fraction: float = 0.1) -> list[bool]:
    """Stable membership of the fixed evaluation set: the first 4 bytes of `title_digest` decide (the loaders'
    duplicate key, so each kept product has its own). Not the product id: cn-jd ids are line numbers (`jd-<line>`),
    and one row added or removed would move every later product in or out of the set. A larger `fraction` holds every
    product a smaller one holds."""
    cut = int(fraction * 2**32)
    return [int.from_bytes(title_digest(p)[:4], "big") < cut for p in products]


def holdout_split(
    products: Sequence[CatalogProduct], *, validation: float = 0.1, test: float = 0.1, seed: int = 0
) -> Split:
    """The fixed evaluation set (`in_holdout` at `test`) as the test part, train and validation stratified from the
    rest: what `tagstream train` trains on, as `train --every` does, so that no model it ships has seen the products
    the `--every` gate compares models on (at its default 10 %)."""
    held = in_holdout(products, test) if test > 0 else [False] * len(products)
    rest = [i for i, h in enumerate(held) if not h]
    inner = stratified_split([products[i] for i in rest], validation=validation, test=0.0, seed=seed)
    parts = [
        [rest[int(i)] for i in inner.train_idx],
        [rest[int(i)] for i in inner.validation_idx],
        [i for i, h in enumerate(held) if h],
    ]
    return _split(len(products), parts, products)


def group_split(
    products: Sequence[CatalogProduct],
    *,
    validation: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
    group: Callable[[CatalogProduct], str | None] = lambda p: p.source,
) -> Split:
    """Hold out whole groups (default: `source`, i.e. merchants/sites) for out-of-domain estimates.

    Groups are shuffled with the seed and assigned to test, then validation, until each part reaches its share of
    the rows; no group appears in two parts. Rows without a group (None/'') always go to train.
    """
    if validation < 0 or test < 0 or validation + test >= 1:
        raise ValueError(f"bad fractions: validation={validation}, test={test}")
    rng = np.random.default_rng(seed)
    by_group: dict[str, list[int]] = {}
    ungrouped: list[int] = []
    for i, p in enumerate(products):
        g = group(p)
        if g:
            by_group.setdefault(g, []).append(i)
        else:
            ungrouped.append(i)
    names = sorted(by_group)
    order = rng.permutation(len(names))
    n = len(products)
    targets = [n * test, n * validation]
    parts: list[list[int]] = [list(ungrouped), [], []]
    for j in order:
        rows = by_group[names[j]]
        if len(parts[2]) + len(rows) <= targets[0] or (not parts[2] and targets[0] > 0):
            parts[2].extend(rows)
        elif len(parts[1]) + len(rows) <= targets[1] or (not parts[1] and targets[1] > 0):
            parts[1].extend(rows)
        else:
            parts[0].extend(rows)
    return _split(n, parts, products)
