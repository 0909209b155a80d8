"""What the data report and the label map say of a catalog's labels: JSONL keys tagstream ignores, a catalog without
labels, excluded attributes in any case, groups left out, and labels only the held-out test part carries (no
TensorFlow: the fit is replaced where training starts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tagstream.errors import DataError
from training.catalog import CatalogProduct
from training.cleaning import DataReport, clean_products
from training.labels import build_label_map, product_labels
from training.loaders import load_catalog
from training.settings import TrainerSettings


def _product(i: int, **kw: Any) -> CatalogProduct:
    return CatalogProduct(f"p{i}", f"product title {i}", **kw)


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- JSONL keys tagstream does not read


def test_jsonl_keys_tagstream_does_not_read_are_named_once_with_counts(tmp_path: Path) -> None:
    rows = [
        {"product_id": f"p{i}", "title": f"shirt {i}", "categories": ["Apparel", "Topwear"], "attributes": {"x": "1"}}
        for i in range(30)
    ]
    rows[0]["attrs"] = {"colour": "Red"}
    report = load_catalog(_jsonl(tmp_path / "c.jsonl", rows), "jsonl").report
    unknown = [w for w in report.warnings if w.startswith("unknown keys ignored")]
    # before: no warning, and the model trained without its categories
    assert len(unknown) == 1 and unknown[0].startswith("unknown keys ignored: 'categories' (30), 'attrs' (1); ")
    assert "category_path" in unknown[0] and report.to_dict()["warnings"] == report.warnings
    whole = load_catalog(_jsonl(tmp_path / "ok.jsonl", [{"product_id": "a", "title": "t", "tags": ["x"]}]), "jsonl")
    assert whole.report.warnings == []


def test_a_catalog_without_any_label_says_so_and_names_the_keys_read() -> None:
    products = [_product(i, attributes={"colour": " "}) for i in range(30)]
    with pytest.raises(DataError) as caught:
        build_label_map(products, min_support=1)
    # before: "no label reaches the minimum support of 1 products"
    assert "the catalog has no labels: none of its 30 products has a category path, an attribute or a free tag" in (
        str(caught.value)
    )
    assert "category_path, attributes and tags" in str(caught.value)
    with pytest.raises(DataError, match="minimum support of 5"):  # labels, all too rare: the other message
        build_label_map([_product(i, category_path=(f"A{i}",)) for i in range(30)], min_support=5)


def test_train_refuses_a_jsonl_catalog_without_labels_in_one_line(tmp_path: Path, capsys) -> None:
    from tagstream.cli import main

    rows = [{"product_id": f"p{i}", "title": f"shirt {i}", "category": "A|B"} for i in range(25)]
    catalog = _jsonl(tmp_path / "typo.jsonl", rows)
    assert main(["train", "--catalog", str(catalog), "--format", "jsonl", "--out", str(tmp_path / "r")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tagstream train: error")]
    assert len(err) == 1 and "the catalog has no labels" in err[0], err


def test_a_long_unknown_key_is_cut_short_keeping_its_closing_quote(tmp_path: Path) -> None:
    rows = [{"product_id": f"p{i}", "title": f"shirt {i}", "tags": ["x"], "k" + "x" * 60: 1} for i in range(3)]
    [warning] = load_catalog(_jsonl(tmp_path / "c.jsonl", rows), "jsonl").report.warnings
    shown = warning.removeprefix("unknown keys ignored: ").split(" (3); ")[0]
    # before: `'kxxxxxxxxx…` (the cut dropped the closing quote)
    assert shown.startswith("'kxxx") and shown.endswith("…'") and len(shown) <= 40, shown


def test_unknown_keys_of_a_row_skipped_as_malformed_are_not_counted(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"product_id": f"p{i}", "title": f"shirt {i}", "tags": ["x"], "categories": ["A"]} for i in range(5)
    ]
    rows += [{"product_id": "bad", "categories": ["A"], "colour": "Red"}]  # no title: skipped
    rows += [{"product_id": "p0", "title": "again", "categories": ["A"], "size": "M"}]  # a second p0: skipped
    result = load_catalog(_jsonl(tmp_path / "c.jsonl", rows), "jsonl")
    assert result.report.rows_skipped == 2 and len(result.products) == 5
    # before: "'categories' (7), 'colour' (1), 'size' (1)"
    assert result.report.unknown_keys == {"categories": 5}


def test_whether_an_attribute_is_excluded_does_not_fold_the_excluded_names_at_every_call(monkeypatch) -> None:
    from training import labels

    folded: list[str] = []
    key = labels._key

    def counting(name: str) -> str:
        folded.append(name)
        return key(name)

    monkeypatch.setattr(labels, "_key", counting)
    exclude = ["Year", "Launch Date", "SKU"]
    assert [labels.is_excluded(n, exclude) for _ in range(100) for n in ("colour", "YEAR", "sku")] == [
        False,
        True,
        True,
    ] * 100
    # before: each call folded the 3 excluded names again (1,200 calls)
    assert len(folded) <= 300 + len(exclude)


def test_train_checks_the_catalogs_names_once_and_says_its_size_when_it_has_no_labels(
    tmp_path: Path, monkeypatch
) -> None:
    from training import labels
    from training import train as train_module

    calls: list[str] = []
    for module in (labels, train_module):
        for name in ("check_attribute_names", "check_tag_names"):
            real = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _n=name, _f=real, **k: (calls.append(_n), _f(*a, **k))[1])
    products = [_product(i, attributes={"colour": " "}) for i in range(100)]
    with pytest.raises(DataError) as caught:
        train_module.train(products, TrainerSettings(baseline=False), registry=tmp_path, progress=False)
    # before: each check ran twice (on the catalog, then again on its training part)
    assert sorted(calls) == ["check_attribute_names", "check_tag_names"]
    # before: "none of its 90 products" (the training and validation parts only)
    assert "the catalog has no labels: none of the " in str(caught.value)
    assert "products it trains on (training and validation; 100 in the catalog)" in str(caught.value)


# ---------------------------------------------------------------- `year`, in any case


@pytest.mark.parametrize("name", ["year", "Year", "YEAR"])
def test_the_year_attribute_is_not_trained_in_any_case_and_the_data_report_says_so(name: str) -> None:
    products = [
        _product(i, category_path=(f"A{i % 2}",), attributes={name: str(2010 + i % 3), "gender": "Men"})
        for i in range(20)
    ]
    assert all(group != name for p in products for group, _ in product_labels(p))
    # before: `Year` and `YEAR` were trained as label groups
    assert name not in build_label_map(products, min_support=1).group_names
    report = DataReport()
    clean_products(enumerate(products, 1), report)
    said = [w for w in report.warnings if name in w]
    assert len(said) == 1 and said[0].startswith(f"attributes {name!r} (20 products) not trained"), report.warnings
    # two spellings of an excluded attribute are no two label groups to refuse
    both = [_product(i, category_path=(f"A{i % 2}",), attributes={name: "2011", "year": "2012"}) for i in range(20)]
    assert build_label_map(both, min_support=1).group_names == ["category_l1"]


# ---------------------------------------------------------------- groups the model does not have


def test_a_group_left_out_for_having_one_label_is_a_warning_of_the_label_map() -> None:
    products = [
        _product(i, category_path=(f"A{i % 2}",), attributes={"material": "Cotton"} if i < 5 else {}) for i in range(20)
    ]
    label_map = build_label_map(products, min_support=1)
    assert "material" not in label_map.group_names
    assert label_map.warnings == [
        "label group material dropped: its only label is material:Cotton (on 5 products), nothing to learn"
    ]
    rare = build_label_map(products, min_support=6)  # material:Cotton on 5 products: below the support
    assert any(w.startswith("label group material dropped: none of its labels is on") for w in rare.warnings)


def test_the_training_report_lists_the_groups_the_model_left_out(tmp_path: Path) -> None:
    from training.cli import _write_report

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    said = "label group material dropped: its only label is material:Cotton (on 20 products), nothing to learn"
    metrics = {"top1": {"n": 0, "groups": {}}, "label_warnings": [said]}
    (bundle / "metrics.json").write_text(json.dumps(metrics))
    data = DataReport(path="c.jsonl", fmt="jsonl")
    _write_report(bundle, tmp_path / "report", data)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    # before: only the log said so; report.json `data.warnings` was [] and the HTML showed `material 1` as a group
    assert report["data"][0]["warnings"] == [said]
    assert "material dropped" in (tmp_path / "report" / "report.html").read_text()


# ---------------------------------------------------------------- the label map of the products that shape the model


def test_a_label_only_the_held_out_test_part_carries_is_unknown_to_the_model(tmp_path: Path, monkeypatch) -> None:
    import training.train as train_module
    from training.evaluate import unknown_labels
    from training.splits import holdout_split

    products = [_product(i, category_path=(f"A{i % 2}",), attributes={"gender": "MW"[i % 2]}) for i in range(200)]
    test_part = holdout_split(products, validation=0.1, test=0.1, seed=42).test
    only_in_test = test_part[0]
    products[products.index(only_in_test)] = only = CatalogProduct(
        only_in_test.product_id, only_in_test.title, category_path=("Z",), attributes={"gender": "M"}
    )
    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fit(train_p, val_p, settings, *, label_map, progress):
        seen["label_map"] = label_map
        raise Stop

    monkeypatch.setattr(train_module, "fit", fit)
    with pytest.raises(Stop):
        train_module.train(products, TrainerSettings(baseline=False), registry=tmp_path, progress=False)
    label_map = seen["label_map"]
    # before: category:Z was an output column no training product had, and its test product counted as known
    assert "category:Z" not in label_map and "category:A0" in label_map
    assert unknown_labels(label_map, [only])["category_l1"] == ["category:Z"]


def test_the_readmes_jsonl_example_loads_as_the_readme_says(tmp_path: Path) -> None:
    import re

    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Catalog format (JSONL)") :]
    example = re.search(r"```jsonl\n(.*?)```", section, re.S)
    assert example is not None
    path = tmp_path / "readme.jsonl"
    path.write_text(example.group(1), encoding="utf-8")
    loaded = load_catalog(path, "jsonl")
    assert loaded.report.skipped == {} and loaded.report.warnings == []
    first, second = loaded.products
    assert first.category_path == ("Apparel", "Topwear", "Shirts") and first.tags == ("casual",)
    assert second.product_id == "2" and second.attributes == {"capacity_mah": "20000"}
    assert len(second.category_path) == 3


def test_labels_that_differ_only_in_case_or_width_are_named_in_a_warning() -> None:
    """`Blue`, `blue` and `Ｂｌｕｅ` became three colour classes, their products split between them, unsaid."""
    colours = ["Blue", "blue", "Ｂｌｕｅ", "Red"]
    products = [_product(i, category_path=(f"A{i % 2}",), attributes={"colour": colours[i % 4]}) for i in range(40)]
    label_map = build_label_map(products, min_support=1)
    [warning] = [w for w in label_map.warnings if "case or width" in w]
    twins = "colour:Blue / colour:blue / colour:Ｂｌｕｅ"
    assert warning == f"label group colour: labels differing only in case or width are separate: {twins}"
    distinct = [p for p in products if p.attributes["colour"] in ("Blue", "Red")]
    assert not [w for w in build_label_map(distinct, min_support=1).warnings if "case or width" in w]


def test_the_data_report_counts_missing_values_and_normalised_text(tmp_path: Path) -> None:
    from training.report import write_report

    rows = [
        {"product_id": "a", "title": "Ｂｌｕｅ  shirt", "category_path": ["Apparel"], "attributes": {"colour": "Blue"}},
        {"product_id": "b", "title": "red shirt", "category_path": ["Apparel"], "brand": "Acme", "price": 5},
        {"product_id": "c", "title": "green\tshirt ", "category_path": ["Apparel"], "attributes": {"colour": " Green"}},
    ]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    report = load_catalog(path, "jsonl").report
    # before: none of this was counted (only derivable from the label counts)
    assert report.missing == {"description": 3, "brand": 2, "price": 2, "attribute:colour": 1}
    assert report.normalised == {"title": 2, "attributes": 1}
    page = write_report(tmp_path / "rep", data=report).html.read_text(encoding="utf-8")
    assert "kept products missing a value: description 3, brand 2, price 2, attribute:colour 1" in page
    assert "normalisation changed (width, white space, control characters): title 2, attributes 1" in page
