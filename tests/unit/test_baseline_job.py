"""The same-run baseline trained in a process of its own, beside the model's fit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tagstream.errors import BaselineProcessError
from tagstream.synth import generate_catalog
from training.baseline import BaselineJob, baseline_scores
from training.catalog import CatalogProduct
from training.splits import stratified_split

REPO = Path(__file__).resolve().parents[2]


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


def test_the_background_baselines_error_is_raised_by_result_with_where_it_failed(synth_split) -> None:
    from training import labels

    train, test = synth_split
    lm = labels.build_label_map(train)
    job = BaselineJob(train[:1], test, lm)  # one product: the vectorizer's min_df leaves no feature
    with pytest.raises(ValueError) as raised:
        job.result()
    assert any("in the baseline process" in note and "fit_baseline" in note for note in raised.value.__notes__)


def test_ctrl_c_is_the_trainers_to_handle_the_baseline_process_is_not_in_its_group(synth_split) -> None:
    from training import labels

    train, test = synth_split
    lm = labels.build_label_map(train)
    job = BaselineJob(train, test, lm)
    # a terminal's Ctrl-C goes to the foreground process group: the trainer's, which cancels the child itself
    assert os.getpgid(job._process.pid) != os.getpgid(0)
    assert np.array_equal(job.result(), baseline_scores(train, test, lm))


def test_a_cancelled_baseline_stops_its_process(synth_split) -> None:
    from training import labels

    train, test = synth_split
    job = BaselineJob(train * 40, test, labels.build_label_map(train))
    job.cancel()
    assert not job.running
    with pytest.raises(BaselineProcessError, match="cancelled"):
        job.result()


def test_a_baseline_process_killed_midway_is_trained_in_process_instead(tmp_path: Path, monkeypatch) -> None:
    import training.train as train_module

    real_result = BaselineJob.result

    def killed_then_result(self: BaselineJob) -> np.ndarray:
        self._process.kill()  # the OOM killer, an operator
        return real_result(self)

    monkeypatch.setattr(BaselineJob, "result", killed_then_result)
    from tests.test_train_e2e import synthetic_products
    from training.settings import TrainerSettings

    settings = TrainerSettings(
        baseline=True, hash_bits=11, max_features=48, embed_dim=16, linear_dim=8, hidden=(16,), epochs=1
    )
    bundle = train_module.train(synthetic_products(160), settings, registry=tmp_path, progress=False)
    assert "baseline" in (bundle / "metrics.json").read_text()


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


def test_a_script_without_a_main_guard_gets_its_baseline(tmp_path: Path) -> None:
    # A multiprocessing child would import the script again as its main module, and start a baseline of its own.
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            """
            from tagstream.synth import generate_catalog
            from training.baseline import BaselineJob
            from training.labels import build_label_map
            from training.splits import stratified_split

            sp = stratified_split(generate_catalog(400, seed=2), validation=0.0, test=0.25, seed=0)
            print(BaselineJob(sp.train, sp.test, build_label_map(sp.train)).result().shape)
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("(") == 1  # one baseline, the script's own


def test_the_baseline_process_runs_below_the_trainers_priority(synth_split) -> None:
    import time

    from training import labels

    train, test = synth_split
    job = BaselineJob(train * 40, test, labels.build_label_map(train), niceness=7)
    try:
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        seen = mine
        deadline = time.monotonic() + 30
        while job.running and seen == mine and time.monotonic() < deadline:
            seen = os.getpriority(os.PRIO_PROCESS, job._process.pid)
            time.sleep(0.02)
        # the fit keeps TensorFlow's threads busy: the baseline takes the CPU they leave idle
        assert seen == min(mine + 7, 19)
    finally:
        job.cancel()
