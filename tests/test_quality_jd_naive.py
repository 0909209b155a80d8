"""bench/quality.py `--only jd-naive`: the model and the baseline on the JD file read as the issue's reference was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.quality import main
from tests.unit.test_jd_reference import _jd_catalog

pytestmark = pytest.mark.slow

SMALL = ["hash_bits=10", "max_features=24", "embed_dim=16", "hidden=[16]", "epochs=2", "batch_size=8", "min_support=1"]


def test_jd_naive_trains_and_scores_on_the_breadcrumb_titles(tmp_path: Path, capsys) -> None:
    out = tmp_path / "quality.json"
    args = ["--data", str(_jd_catalog(tmp_path)), "--only", "jd-naive", "--out", str(out)]
    assert main(args + [f"--set={s}" for s in SMALL]) == 0
    run = json.loads(out.read_text(encoding="utf-8"))["jd-naive"]
    # the naive reading keeps 24 shoes, 1 printed-book breadcrumb (the rest are its duplicates) and 12 e-book ones
    assert sum(run["sizes"].values()) == 37
    for side in ("model", "baseline"):
        leaf = run[side]["category_leaf"]
        assert 0.0 <= leaf["weighted_f1"] <= 1.0 and 0 < leaf["n"] <= run["sizes"]["test"]
    assert set(run["model_by_top_level"]) >= {"健康运动、户外", "all but 出版物"}
    printed = capsys.readouterr().out
    assert "jd-naive.category_leaf" in printed and "jd-naive.leaf 出版物" in printed
