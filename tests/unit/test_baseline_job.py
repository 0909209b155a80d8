"""The same-run baseline trained in a process of its own, beside the model's fit."""

from __future__ import annotations

import numpy as np
import pytest

from tagstream.synth import generate_catalog
from training.baseline import BaselineJob, baseline_scores
from training.catalog import CatalogProduct
from training.splits import stratified_split


@pytest.fixture(scope="module")
def synth_split() -> tuple[list[CatalogProduct], list[CatalogProduct]]:
    sp = stratified_split(generate_catalog(600, seed=5), validation=0.0, test=0.25, seed=0)
    return sp.train, sp.test


def test_the_background_baseline_gives_the_scores_the_baseline_gives_in_process(synth_split) -> None:
    from training import labels

    train, test = synth_split
    lm = labels.build_label_map(train)
    job = BaselineJob(train, test, lm)
    assert np.array_equal(job.result(), baseline_scores(train, test, lm))


def test_the_background_baselines_error_is_raised_by_result(synth_split) -> None:
    from training import labels

    train, test = synth_split
    lm = labels.build_label_map(train)
    job = BaselineJob(train[:1], test, lm)  # one product: the vectorizer's min_df leaves no feature
    with pytest.raises(ValueError):
        job.result()


def test_a_cancelled_baseline_stops_its_process(synth_split) -> None:
    from training import labels

    train, test = synth_split
    job = BaselineJob(train * 40, test, labels.build_label_map(train))
    job.cancel()
    assert not job.running
    with pytest.raises(RuntimeError, match="without scores"):
        job.result()


def test_a_failed_fit_stops_the_baseline_and_raises_the_fits_error(tmp_path, monkeypatch) -> None:
    import training.train as train_module
    from tests.test_train_e2e import synthetic_products
    from training.settings import TrainerSettings

    started: list[BaselineJob] = []
    real_init = BaselineJob.__init__

    def recording_init(self: BaselineJob, *args: object) -> None:
        real_init(self, *args)
        started.append(self)

    def failing_fit(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(BaselineJob, "__init__", recording_init)
    monkeypatch.setattr(train_module, "fit", failing_fit)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(synthetic_products(120), TrainerSettings(baseline=True), registry=tmp_path, progress=False)
    assert len(started) == 1 and not started[0].running  # cancelled, not left to finish
