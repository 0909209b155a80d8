"""bench/quality.py prints its bootstrap-interval header only above intervals (`--only featurizer` has none)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import bench.quality as quality
import training.train

HEADER = "95 % bootstrap intervals over the test products"


@pytest.fixture
def no_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """No catalogs read, no TensorFlow, no training: each run's figures are canned."""
    monkeypatch.setattr(training.train, "configure_tensorflow", lambda threads: None)
    monkeypatch.setattr(quality, "load_catalog", lambda path, fmt: SimpleNamespace(products=[]))
    monkeypatch.setattr(quality, "stratified_split", lambda products, **kwargs: None)
    figures = {"batch_us_per_title": 20.0, "single_us_per_title": 200.0, "mean_title_chars": 30.0}
    monkeypatch.setattr(quality, "run_featurizer", lambda jd, myntra: {"chinese_jd": figures})

    def run_split(name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        leaf = {"weighted_f1": 0.9, "weighted_f1_ci95": [0.88, 0.92]}
        return {"model": dict.fromkeys(("category_l1", "category_l2", "category_leaf"), leaf), "baseline": {},
                "model_by_top_level": {}}  # fmt: skip

    monkeypatch.setattr(quality, "run_split", run_split)


@pytest.mark.usefixtures("no_data")
def test_no_interval_header_without_intervals(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert quality.main(["--only", "featurizer", "--out", str(tmp_path / "q.json")]) == 0
    out = capsys.readouterr().out
    assert "featurizer chinese_jd" in out and HEADER not in out


@pytest.mark.usefixtures("no_data")
def test_the_interval_header_stands_above_the_intervals(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert quality.main(["--only", "jd", "--out", str(tmp_path / "q.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(HEADER))
    assert lines[at + 1] == "  jd.category_leaf weighted_f1: 0.880–0.920; -"
