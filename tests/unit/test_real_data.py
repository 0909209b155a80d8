"""The real public data (../shared/data or $TAGSTREAM_SHARED_DATA): every file loads with the expected counts.

`TAGSTREAM_DATA_DIR` is the worker's Faust directory (streams/settings.py), never read here.

Skipped with a reason when the data directory is absent (CI has it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tagstream.synth import load_click_log, map_clicks_to_catalog
from training.loaders import load_catalog

DATA = Path(os.environ.get("TAGSTREAM_SHARED_DATA") or Path(__file__).parents[2].parent / "shared" / "data")

pytestmark = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"real data directory {DATA} not found (set TAGSTREAM_SHARED_DATA)"
)


def _file(rel: str) -> Path:
    p = DATA / rel
    if not p.exists():
        pytest.skip(f"{p} not present")
    return p


def test_jd_products() -> None:
    res = load_catalog(_file("cn-products-jd/products.csv"), "cn-jd")
    r = res.report
    assert r.rows_read == pytest.approx(55_198, abs=100)
    assert r.skipped["concatenated_records"] == 3
    assert 4_000 < r.repaired["title_breadcrumb_swapped"] < 5_500  # book rows with breadcrumb first
    assert 90 < r.repaired["unquoted_comma_in_title_or_breadcrumb"] < 130
    assert 52_000 < r.rows_kept < 54_500
    assert len(r.label_counts["category_l1"]) == 10
    assert 40 <= len(r.label_counts["category_l2"]) <= 45
    assert 650 < len(r.label_counts["category_leaf"]) <= 697
    assert not any(">" in p.title and p.title.startswith(("首页>", "图书>")) for p in res.products)
    assert sum(p.source is not None for p in res.products) > 45_000


def test_myntra_styles() -> None:
    res = load_catalog(_file("fashion-myntra-styles/styles.csv.zip"), "myntra")
    r = res.report
    assert r.rows_read == pytest.approx(44_446, abs=10)
    assert r.repaired["unquoted_comma_in_title"] == 22
    assert r.skipped.get("too_few_fields", 0) == 0
    assert r.rows_parsed == r.rows_read
    assert 28_000 < r.rows_kept < 33_000  # identical names collapse (see the data report's duplicates)
    assert set(r.label_counts) >= {"category_l1", "category_l2", "category_leaf", "gender", "colour", "usage"}
    assert len(r.label_counts["gender"]) == 5 and len(r.label_counts["category_l1"]) == 7
    assert "year" not in r.label_counts


def test_bigbasket_products() -> None:
    res = load_catalog(_file("bigbasket-products/BigBasket Products.csv"), "bigbasket")
    r = res.report
    assert r.rows_read == pytest.approx(27_555, abs=10)
    assert r.skipped["empty_title"] == 1
    assert 21_000 < r.rows_kept < 23_600  # 23,541 unique names before resolving label conflicts
    assert len(r.label_counts["category_l1"]) == 11
    assert all(p.currency == "INR" for p in res.products)
    assert sum(p.price is not None for p in res.products) == len(res.products)


@pytest.mark.parametrize(
    ("rel", "fmt", "n"),
    [
        ("clickstream-taobao-userbehavior-sample/betashepherd-HotItems/UserBehavior.csv", "taobao", 10_000),
        ("clickstream-taobao-userbehavior-sample/fattydelivery/UserBehavior.csv", "taobao", 4_321),
        ("clickstream-yoochoose-100k/yoochoose-clicks-100k_test.txt", "yoochoose", 13_568),
        ("clickstream-diginetica-sample/sample_train-item-views.csv", "diginetica", 12_391),
    ],
)
def test_click_logs(rel: str, fmt: str, n: int) -> None:
    from tagstream.synth import generate_catalog

    log = load_click_log(_file(rel), fmt)
    assert log.rows_read == n and len(log.events) == n and not log.skipped
    if rel.startswith("clickstream-taobao") and "HotItems" in rel:
        assert log.event_mix() == {"view": 9046, "add_to_cart": 536, "click": 212, "purchase": 206}
    mapped = map_clicks_to_catalog(log, generate_catalog(500, seed=0))
    assert len(mapped) == n and all(e["ts"] > 1_300_000_000_000 for e in mapped[:100])
