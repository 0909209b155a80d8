"""Fitting when validation lacks a label group: a rare attribute, a small catalog, a catalog of free tags only
(TensorFlow, tiny settings)."""

from __future__ import annotations

import itertools

from training.catalog import CatalogProduct

TINY = {
    "hash_bits": 10,
    "max_features": 32,
    "embed_dim": 8,
    "linear_dim": 4,
    "hidden": (8,),
    "epochs": 2,
    "refit_epochs": 0,
    "batch_size": 16,
    "min_support": 1,
    "monitor": "val_f1",
}


def _products(n: int, start: int = 0, *, colour_on: int = 0) -> list[CatalogProduct]:
    """`n` phones and laptops; the first `colour_on` of them carry a colour."""
    return [
        CatalogProduct(
            f"p{i}",
            f"{'phone' if i % 2 else 'laptop'} model {i}",
            category_path=("Electronics", "Phones" if i % 2 else "Laptops"),
            attributes={"colour": "Red" if i % 3 else "Blue"} if i - start < colour_on else {},
        )
        for i in range(start, start + n)
    ]


def test_an_attribute_no_validation_product_carries_does_not_stop_the_fit() -> None:
    from training.settings import TrainerSettings
    from training.train import fit

    train_p, val_p = _products(36, colour_on=3), _products(8, start=36)  # colour: in training only
    # before: KeyError: 'weighted_f1' at the end of the first epoch (`tagstream train` died with a traceback)
    result = fit(train_p, val_p, TrainerSettings(**TINY), progress=False)
    assert "colour" in result.label_map.group_names
    scores = result.history["val_f1"]
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores), scores


def test_a_catalog_of_free_tags_only_picks_its_best_epoch_by_validation_loss() -> None:
    from training.settings import TrainerSettings
    from training.train import fit

    tagged = [
        CatalogProduct(f"t{i}", f"shirt {i} {'sale' if i % 2 else 'eco'}", tags=("sale" if i % 2 else "eco",))
        for i in range(48)
    ]
    settings = TrainerSettings(**{**TINY, "epochs": 4, "patience": 0, "learning_rate": 1e-2})
    result = fit(tagged[:36], tagged[36:], settings, progress=False)
    losses = result.history["val_loss"]
    assert all(b < a for a, b in itertools.pairwise(losses)), losses  # it keeps learning
    # before: every epoch scored NaN (the mean of no group), so the first stayed "best" and, with patience 0, the
    # fit stopped after the second epoch with the first epoch's weights
    assert result.history["val_f1"] == [0.0] * 4 and result.timings["epochs_run"] == 4
