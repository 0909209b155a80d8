"""The refit epochs on train + validation after the best epoch and the thresholds were picked (TensorFlow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.test_train_e2e import synthetic_products

TINY = {
    "hash_bits": 11,
    "max_features": 48,
    "embed_dim": 16,
    "linear_dim": 8,
    "hidden": (16,),
    "epochs": 5,
    "batch_size": 16,
    "learning_rate": 1e-2,
    "min_support": 3,
    "parity_samples": 240,
}


def test_the_refit_trains_on_validation_too_and_keeps_the_validation_thresholds() -> None:
    from training.settings import TrainerSettings
    from training.splits import stratified_split
    from training.train import featurize, fit

    sp = stratified_split(synthetic_products(240), validation=0.2, test=0.0, seed=0)
    plain = fit(sp.train, sp.validation, TrainerSettings(**TINY, refit_epochs=0), progress=False)
    refit = fit(sp.train, sp.validation, TrainerSettings(**TINY, refit_epochs=2), progress=False)

    assert "refit_loss" not in plain.history and plain.timings["refit_s"] == 0.0
    assert len(refit.history["refit_loss"]) == 2 and refit.timings["refit_s"] > 0
    assert refit.thresholds == plain.thresholds  # tuned on validation before the refit saw it
    x_val = featurize(refit.featurizer, sp.validation, progress=False)
    assert not np.allclose(plain.predict(x_val), refit.predict(x_val))  # same start, then trained further


def test_a_refitted_model_exports_and_passes_the_parity_gate(tmp_path: Path) -> None:
    from training.settings import TrainerSettings
    from training.train import train

    settings = TrainerSettings(**TINY, refit_epochs=1, model_name="refit")
    bundle_dir = train(synthetic_products(240), settings, registry=tmp_path, progress=False)
    metrics = json.loads((bundle_dir / "metrics.json").read_text())
    assert len(metrics["history"]["refit_loss"]) == 1 and metrics["timings"]["refit_s"] > 0
    assert metrics["parity"]["max_abs_diff"] <= settings.parity_atol and metrics["parity"]["decision_flips"] == 0
    assert metrics["top1"]["groups"]["category_leaf"]["accuracy"] > 0.8, metrics["top1"]


def test_the_same_seed_trains_the_same_model_and_another_seed_another() -> None:
    # the fits' batches come from training.batches (a seeded shuffle per epoch), the refit's too
    from training.settings import TrainerSettings
    from training.splits import stratified_split
    from training.train import featurize, fit

    sp = stratified_split(synthetic_products(240), validation=0.2, test=0.0, seed=0)
    runs = [
        fit(sp.train, sp.validation, TrainerSettings(**{**TINY, "epochs": 2}, refit_epochs=1, seed=s), progress=False)
        for s in (5, 5, 6)
    ]
    x_val = featurize(runs[0].featurizer, sp.validation, progress=False)
    first, again, other = (r.predict(x_val) for r in runs)
    assert runs[0].history["loss"] == runs[1].history["loss"]
    assert runs[0].history["refit_loss"] == runs[1].history["refit_loss"]
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other, atol=1e-3)
