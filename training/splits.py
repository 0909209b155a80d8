"""Train/validation/test splits: stratified by leaf label (in-domain) and grouped by source (out-of-domain).

Both return a `Split` of index arrays into the product list (sorted, disjoint, covering every product) with the
products of each part at hand. Everything is deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from training.catalog import CatalogProduct

__all__ = ["Split", "group_split", "leaf_label", "stratified_split"]


def leaf_label(p: CatalogProduct) -> str:
    """The full category path (unique leaf name), '' when the product has no category."""
    return "/".join(p.category_path)


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
