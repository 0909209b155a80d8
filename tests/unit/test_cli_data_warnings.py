"""What `tagstream train` and `evaluate` say on stderr about the catalog: rows skipped, and products the model
trained on (no TensorFlow: refused before training, or a tiny ONNX bundle)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from training.catalog import CatalogProduct

GOOD = [
    CatalogProduct(f"e{i}", f"Clothing shirt {i}", category_path=("Clothing", "Shirts"), attributes={"colour": "Black"})
    for i in range(12)
]


def _catalog(path: Path, products: list[CatalogProduct], bad: int) -> Path:
    """A JSONL catalog of `products` with `bad` rows whose attribute is a boolean (skipped as bad_attributes) after
    the second one."""
    lines = [json.dumps(p.to_json(), ensure_ascii=False) for p in products]
    rows = [
        json.dumps({"product_id": f"b{i}", "title": f"bad {i}", "attributes": {"is_sale": False}}) for i in range(bad)
    ]
    path.write_text("\n".join(lines[:2] + rows + lines[2:]) + "\n", encoding="utf-8")
    return path


def _stderr_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("tagstream ")]


def test_evaluate_says_in_one_line_how_many_rows_it_skipped_and_why(tmp_path: Path, capsys) -> None:
    from tagstream.cli import main
    from tests.models import featurized_bundle

    bundle = featurized_bundle(tmp_path / "registry")
    catalog = _catalog(tmp_path / "c.jsonl", GOOD, bad=4)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(bundle), "--catalog", str(catalog), "--format", "jsonl", "--json"]) == 0
    warnings = [line for line in _stderr_lines(capsys) if "rows skipped" in line]
    # before: only "loaded 12 products" in the log, the 4 rows gone without a word
    assert warnings == [
        f"tagstream evaluate: warning: {catalog}: 4 of 16 rows skipped: bad_attributes 4 (first at line 3)"
    ]


def test_train_says_in_one_line_how_many_rows_it_skipped_before_anything_else(tmp_path: Path, capsys) -> None:
    from tagstream.cli import main

    catalog = _catalog(tmp_path / "c.jsonl", GOOD, bad=3)
    code = main(["train", "--catalog", str(catalog), "--format", "jsonl", "--out", str(tmp_path / "reg")])
    lines = _stderr_lines(capsys)
    assert code == 2  # 12 products: too few to train, refused before any TensorFlow
    assert lines[0] == f"tagstream train: warning: {catalog}: 3 of 15 rows skipped: bad_attributes 3 (first at line 3)"
    assert "need at least 20 products" in lines[1]


def test_a_catalog_read_by_a_retrain_cycle_logs_the_rows_it_skipped(
    tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    from training.cli import _load

    catalog = _catalog(tmp_path / "c.jsonl", GOOD, bad=2)
    with caplog.at_level(logging.WARNING, logger="training.cli"):
        assert len(_load(catalog, "jsonl", "train", every=True).products) == 12
    assert "2 of 14 rows skipped: bad_attributes 2 (first at line 3)" in caplog.text
    assert _stderr_lines(capsys) == []  # the cycle's JSON line and the log say it, not a stray stderr line


def test_a_whole_catalog_loads_without_a_warning(tmp_path: Path, capsys) -> None:
    from training.cli import _load

    _load(_catalog(tmp_path / "c.jsonl", GOOD, bad=0), "jsonl", "evaluate")
    assert _stderr_lines(capsys) == []


def test_evaluate_warns_when_products_of_the_catalog_were_in_the_models_training_data(tmp_path: Path, capsys) -> None:
    from tagstream.cli import main
    from tests.models import featurized_bundle
    from tests.tinymodel import tamper
    from training.splits import trained_on_record

    bundle = featurized_bundle(tmp_path / "registry")
    record = trained_on_record(GOOD[:9])  # it trained on 9 of the 12
    tamper(bundle, "metrics.json", json.dumps({"trained_on": record}).encode())
    catalog = _catalog(tmp_path / "c.jsonl", GOOD, bad=0)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(bundle), "--catalog", str(catalog), "--format", "jsonl", "--json"]) == 0
    # before: the figures were printed as if the catalog were unseen
    assert (
        "tagstream evaluate: warning: 9 of 12 products were in the model's training data: the figures are optimistic"
    ) in _stderr_lines(capsys)
    unseen = _catalog(tmp_path / "u.jsonl", GOOD[9:], bad=0)
    assert main(["evaluate", "--model", str(bundle), "--catalog", str(unseen), "--format", "jsonl", "--json"]) == 0
    assert not any("training data" in line for line in _stderr_lines(capsys))


def test_attribute_labels_dropped_from_kept_products_are_one_more_warning_line(tmp_path: Path, capsys) -> None:
    from tagstream.cli import main
    from tests.models import featurized_bundle

    bundle = featurized_bundle(tmp_path / "registry")
    tied = [  # the same title twice with two colours: the duplicates are merged and the tied colour dropped
        {"product_id": "t1", "title": "Clothing shirt 0", "category_path": ["Clothing", "Shirts"], "attributes": a}
        for a in ({"colour": "Black"}, {"colour": "Red"})
    ]
    tied[1]["product_id"] = "t2"
    clash = {  # two names that clean to one ("colour"), with different values: the attribute is dropped
        "product_id": "c1",
        "title": "Clothing shirt 99",
        "category_path": ["Clothing", "Shirts"],
        "attributes": {"colour": "Black", "colour ": "Red"},
    }
    lines = [json.dumps(p.to_json(), ensure_ascii=False) for p in GOOD[1:]] + [json.dumps(r) for r in (*tied, clash)]
    catalog = tmp_path / "c.jsonl"
    catalog.write_text("\n".join(lines) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["evaluate", "--model", str(bundle), "--catalog", str(catalog), "--format", "jsonl", "--json"]) == 0
    warnings = [line for line in _stderr_lines(capsys) if "labels dropped" in line]
    # before: only the data report of `train` said so; `evaluate` nowhere
    assert warnings == [
        f"tagstream evaluate: warning: {catalog}: attribute labels dropped from kept products: colour 1 (a product's "
        "duplicate rows tie on its value); 1 rows with two attribute names equal once cleaned and different values "
        "(first at line 14)"
    ]
