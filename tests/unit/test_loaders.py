"""Loaders, cleaning and splits on small hand-written inputs (malformed rows, wrong formats, duplicates)."""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tagstream.errors import DataError
from training.catalog import CatalogProduct
from training.cleaning import DataReport, clean_products, clean_text, normalize_text
from training.loaders import LOADERS, load_catalog
from training.splits import group_split, stratified_split

JD_ROWS = [
    "1005009003,运动|运动鞋|跑步鞋,ERKE/鸿星尔克 跑步鞋 黑色 37,服饰内衣>运动>跑步鞋>ERKE...,京东商城,俊林运动专营店",
    "1005009004,运动|运动鞋|篮球鞋,李宁 篮球鞋 (防滑,耐磨) 白色,服饰内衣>运动>篮球鞋>李宁 (防滑,耐磨),京东商城,李宁店",
    "1025002006,出版物|图书|小说,图书>小说>中国当代小说,滚打人生,京东商城,",
    "1025002007,出版物|电子书|旅游,首页>电子书>Travel>Rome,Italy:Fromme…,Rome, Italy: Frommer's ShortCuts,京东商城,\\N",
    "1005009003,运动|运动鞋,只有五个字段,京东商城,x",
    "1019006008,家居|家具|晾衣架,双庆 晾衣架,所有分类>家居>收纳架,1号店,收纳架,,世家 晾衣架,世家>晾衣架,京东商城,世家",
    "1005009003,运动|运动鞋|跑步鞋,   ,服饰内衣>运动>跑步鞋,京东商城,某店",
    "1005009003,运动|运动鞋|跑步鞋,ＥＲＫＥ/鸿星尔克   跑步鞋 黑色 37,服饰内衣>运动>跑步鞋>ERKE...,京东商城,另一店",
    "abc,运动|运动鞋|跑步鞋,标题,服饰内衣>运动,京东商城,店",
]


def write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_jd_commas_swaps_and_malformed_rows(tmp_path: Path) -> None:
    res = load_catalog(write(tmp_path, "products.csv", JD_ROWS), "cn-jd")
    by_id = {p.product_id: p for p in res.products}
    assert by_id["jd-1"].title == "ERKE/鸿星尔克 跑步鞋 黑色 37"
    assert by_id["jd-1"].category_path == ("运动", "运动鞋", "跑步鞋")
    assert by_id["jd-1"].source == "俊林运动专营店"
    assert by_id["jd-2"].title == "李宁 篮球鞋 (防滑,耐磨) 白色"  # comma inside title and breadcrumb
    assert by_id["jd-3"].title == "滚打人生"  # breadcrumb first: swapped back
    assert by_id["jd-3"].source is None
    assert by_id["jd-4"].title == "Rome, Italy: Frommer's ShortCuts"
    assert by_id["jd-4"].source is None  # \N
    assert by_id["jd-1"].description is None  # the breadcrumb leaks the label: never used
    r = res.report
    assert r.rows_read == 9
    assert r.skipped["too_few_fields"] == 1
    assert r.skipped["concatenated_records"] == 1
    assert r.skipped["empty_title"] == 1
    assert r.skipped["bad_category_id"] == 1
    assert r.skipped["duplicate"] == 1  # line 8 = line 1 after NFKC + whitespace normalisation
    assert r.repaired["title_breadcrumb_swapped"] == 2
    lines = {(e["line"], e["reason"]) for e in r.examples}
    assert (5, "too_few_fields") in lines and (6, "concatenated_records") in lines and (9, "bad_category_id") in lines
    assert r.rows_kept == len(res.products) == 4
    d = r.to_dict()
    assert d["skipped"]["too_few_fields"] == 1 and d["n_labels"]["category_leaf"] == 4
    assert "too_few_fields" in r.to_markdown()


def test_wrong_format_and_missing_file_raise_data_error(tmp_path: Path) -> None:
    jd = write(tmp_path, "products.csv", JD_ROWS)
    with pytest.raises(DataError, match=r"products.csv: line 1: invalid_json"):
        load_catalog(jd, "jsonl")
    with pytest.raises(DataError, match=r"line 1: header"):
        load_catalog(jd, "myntra")
    with pytest.raises(DataError, match=r"line 1: header"):
        load_catalog(jd, "bigbasket")
    myn = write(tmp_path, "styles.csv", MYNTRA)
    with pytest.raises(DataError, match=r"styles.csv: line 1: bad_category_id"):
        load_catalog(myn, "cn-jd")
    with pytest.raises(DataError, match=r"^no such file: .*nope\.csv$"):
        load_catalog(tmp_path / "nope.csv", "cn-jd")
    with pytest.raises(DataError, match="unknown format"):
        load_catalog(jd, "xml")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(DataError, match="line 1: not UTF-8"):
        load_catalog(tmp_path / "bin.jsonl", "jsonl")
    assert set(LOADERS) == {"cn-jd", "myntra", "bigbasket", "jsonl"}


def test_mostly_malformed_file_is_rejected(tmp_path: Path) -> None:
    lines = [JD_ROWS[0]] + ["1,2,3"] * 5
    with pytest.raises(DataError, match=r"line 2: too_few_fields .* 5 of 6 rows malformed"):
        load_catalog(write(tmp_path, "p.csv", lines), "cn-jd")


MYNTRA = [
    "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName",
    "15970,Men,Apparel,Topwear,Shirts,Navy Blue,Fall,2011,Casual,Turtle Check Men Navy Blue Shirt",
    "23124,Unisex,Footwear,Flip Flops,Flip Flops,Navy Blue,Spring,2013,Casual,Converse Liv,Laugh,Love Flip-flops",
    "7491,Women,Apparel,Bottomwear,Shorts,Pink,Summer,2011,Sports,Nike Women's EM Tempo 3.5\" Pink Short",
    "30991,Women,Personal Care,Fragrance,Perfume and Body Mist,NA,Spring,2017,NA,Davidoff Women Cool Water",
    "42878,Women,Accessories,Bags,Clutches,Maroon,Summer,2012,Casual,NA",
    "x1,Men,Apparel",
]


def test_myntra_plain_and_zip(tmp_path: Path) -> None:
    plain = write(tmp_path, "styles.csv", MYNTRA)
    zpath = tmp_path / "styles.csv.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.write(plain, "styles.csv")
    for path in (plain, zpath):
        res = load_catalog(path, "myntra")
        by_id = {p.product_id: p for p in res.products}
        assert by_id["myntra-23124"].title == "Converse Liv,Laugh,Love Flip-flops"
        assert by_id["myntra-7491"].title.endswith('3.5" Pink Short')
        assert by_id["myntra-15970"].category_path == ("Apparel", "Topwear", "Shirts")
        assert by_id["myntra-15970"].attributes == {
            "gender": "Men",
            "colour": "Navy Blue",
            "season": "Fall",
            "usage": "Casual",
        }
        assert by_id["myntra-30991"].attributes == {"gender": "Women", "season": "Spring"}  # NA → absent
        assert res.report.skipped == Counter({"empty_title": 1, "too_few_fields": 1})
        assert res.report.repaired["unquoted_comma_in_title"] == 1


@pytest.mark.parametrize("quoting", ["all", "minimal"])
def test_myntra_re_saved_with_quoted_fields_loads_like_the_original(tmp_path: Path, quoting: str) -> None:
    """A styles.csv opened and saved again (pandas, a spreadsheet) quotes its fields: every row was refused as a
    bad id with no word of quoting. Quoted fields read as CSV; a quoted title keeps its commas and quotes."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_ALL if quoting == "all" else csv.QUOTE_MINIMAL, lineterminator="\n")
    writer.writerows(line.split(",", 9) for line in MYNTRA[:4])  # the header, and titles with commas and quotes
    path = tmp_path / "styles.csv"
    path.write_text(out.getvalue(), encoding="utf-8")
    res = load_catalog(path, "myntra")
    by_id = {p.product_id: p for p in res.products}
    assert by_id["myntra-23124"].title == "Converse Liv,Laugh,Love Flip-flops"
    assert by_id["myntra-7491"].title == "Nike Women's EM Tempo 3.5\" Pink Short"
    assert by_id["myntra-7491"].attributes == {
        "gender": "Women",
        "colour": "Pink",
        "season": "Summer",
        "usage": "Sports",
    }
    assert res.report.skipped == Counter() and res.report.repaired == Counter()


def test_bigbasket_quoted_fields_and_prices(tmp_path: Path) -> None:
    rows = [
        "index,product,category,sub_category,brand,sale_price,market_price,type,rating,,",
        "1,Garlic Oil - Capsule 500 mg,Beauty & Hygiene,Hair Care,Sri Sri Ayurveda ,220,220,Hair Oil & Serum,4.1,,4.1",
        '2,Water Bottle - Orange,"Kitchen, Garden & Pets",Storage,Mastercook,,180,Water Bottles,2.3,,',
        '3,Bad Price,"Kitchen, Garden & Pets",Storage,Mastercook,abc,180,Water Bottles,2.3,,',
        '4,"Multi ""quoted"" name",Beverages,Coffee,Cothas,200,240,Ground Coffee,4.2,,',
    ]
    res = load_catalog(write(tmp_path, "bb.csv", rows), "bigbasket")
    by_id = {p.product_id: p for p in res.products}
    assert by_id["bigbasket-1"].brand == "Sri Sri Ayurveda" and by_id["bigbasket-1"].price == 220.0
    assert by_id["bigbasket-1"].currency == "INR"
    assert by_id["bigbasket-2"].category_path == ("Kitchen, Garden & Pets", "Storage", "Water Bottles")
    assert by_id["bigbasket-2"].price is None  # missing price → None
    assert by_id["bigbasket-4"].title == 'Multi "quoted" name'
    assert res.report.skipped["bad_price"] == 1


def test_jsonl_round_trip_and_bad_lines(tmp_path: Path) -> None:
    from tagstream.synth import write_jsonl

    prods = [
        CatalogProduct("a-1", "Red Shirt", brand="X", price=9.5, category_path=("A", "B", "C"), attributes={"c": "r"}),
        CatalogProduct("a-2", "Blue Shirt", category_path=("A", "B", "D"), source="shop"),
    ]
    path = tmp_path / "c.jsonl"
    write_jsonl(prods, path)
    with path.open("a", encoding="utf-8") as f:
        f.write("{not json\n")
        f.write('["a list"]\n')
        f.write('{"product_id": "a-1", "title": "dup"}\n')
        f.write('{"title": "no id"}\n')
        f.write('{"product_id": "has space", "title": "x"}\n')
        f.write("\n")
        f.write('{"product_id": "a-3", "title": "Green Shirt", "price": "12.0"}\n')
        for i in range(4, 8):
            f.write(f'{{"product_id": "a-{i}", "title": "Shirt {i}"}}\n')
    res = load_catalog(path, "jsonl")
    assert [p.product_id for p in res.products] == [f"a-{i}" for i in range(1, 8)]
    assert res.products[0] == prods[0] and res.products[1] == prods[1]
    assert res.products[2].price == 12.0
    sk = res.report.skipped
    assert sk["invalid_json"] == 1 and sk["not_an_object"] == 1 and sk["duplicate_product_id"] == 1
    assert sk["missing_product_id"] == 1 and sk["bad_product_id"] == 1 and res.report.blank_lines == 1
    assert {"line": 3, "kind": "skipped", "reason": "invalid_json"}.items() <= res.report.examples[0].items()


def test_blank_lines_and_cr_cr_lf_line_ends_are_not_malformed_rows(tmp_path: Path) -> None:
    rows = [f'{{"product_id": "p{i}", "title": "title {i}", "category_path": ["A", "B"]}}' for i in range(4)]
    spaced = tmp_path / "spaced.jsonl"
    spaced.write_text("".join(r + "\n\n \n" for r in rows), encoding="utf-8")
    res = load_catalog(spaced, "jsonl")
    assert [p.product_id for p in res.products] == ["p0", "p1", "p2", "p3"]
    r = res.report
    assert (r.rows_read, r.rows_skipped, r.blank_lines) == (4, 0, 8)
    assert r.to_dict()["blank_lines"] == 8 and "blank lines: 8" in r.to_markdown()

    crcrlf = tmp_path / "crcrlf.jsonl"  # a CRLF file converted once more: every line ends in \r\r\n
    crcrlf.write_bytes("".join(line + "\r\r\n" for line in [*rows, "{not json", rows[0].replace("p0", "p9")]).encode())
    res = load_catalog(crcrlf, "jsonl")
    assert len(res.products) == 4  # p9 is p0's title again: a duplicate
    assert res.report.blank_lines == 0 and res.report.rows_read == 6
    assert [(e["line"], e["reason"]) for e in res.report.examples] == [(5, "invalid_json"), (6, "duplicate")]


BB_HEADER = "index,product,category,sub_category,brand,sale_price,market_price,type,rating,description"


def _bb(tmp_path: Path, titles: dict[int, str]) -> Path:
    rows = [f"{i},{titles.get(i, f'Product {i}')},Cat,Sub,Brand,10,12,Type,4.0,desc" for i in range(1, 9)]
    return write(tmp_path, "bb.csv", [BB_HEADER, *rows])


def test_bigbasket_inch_marks_in_titles_lose_no_rows(tmp_path: Path) -> None:
    res = load_catalog(_bb(tmp_path, {2: 'Pizza Pan 10" Round', 5: 'TV 32" LED'}), "bigbasket")
    titles = {p.product_id: p.title for p in res.products}
    assert len(titles) == 8 and res.report.rows_read == 8 and not res.report.skipped
    assert titles["bigbasket-2"] == 'Pizza Pan 10" Round' and titles["bigbasket-5"] == 'TV 32" LED'


def test_bigbasket_a_quote_that_never_closes_skips_only_its_own_line(tmp_path: Path) -> None:
    titles = {
        2: '"Peanut Butter\nCreamy"',  # a quoted title over two lines (the real file has two): one record
        4: '"Pizza Pan 10 Round',  # opened, never closed
        5: 'TV 32" LED',
        7: '"Pan 10" Round"',  # a quoted field with a stray quote inside
    }
    res = load_catalog(_bb(tmp_path, titles), "bigbasket")
    r = res.report
    by_id = {p.product_id: p.title for p in res.products}
    assert sorted(by_id) == [f"bigbasket-{i}" for i in (1, 2, 3, 5, 6, 8)]
    assert by_id["bigbasket-2"] == "Peanut Butter Creamy" and by_id["bigbasket-5"] == 'TV 32" LED'
    assert r.rows_read == 8 and r.rows_parsed == 6  # every data row counted, the two-line title once
    skipped = {(e["line"], e["reason"]) for e in r.examples}
    assert skipped == {(6, "unterminated_quote"), (9, "bad_csv_quoting")}  # file lines: header = 1, row 2 = 2-3


def test_bigbasket_a_blank_line_inside_a_quoted_title_is_part_of_it(tmp_path: Path) -> None:
    # before: blank lines were dropped before records were put together: the three inside the titles were taken out
    # of their fields and counted as blank lines between records (7 in the data report instead of 4)
    path = _bb(tmp_path, {3: '"Gift Hamper\n\n  \nDiwali Special"', 6: '"Tea\n\nBags"'})
    path.write_text("\n\n" + path.read_text() + "\n\n", encoding="utf-8")  # blank lines between records, too
    res = load_catalog(path, "bigbasket")
    r = res.report
    by_id = {p.product_id: p.title for p in res.products}
    assert sorted(by_id) == [f"bigbasket-{i}" for i in range(1, 9)] and not r.skipped
    assert by_id["bigbasket-3"] == "Gift Hamper Diwali Special" and by_id["bigbasket-6"] == "Tea Bags"
    assert r.rows_read == 8 and r.blank_lines == 4  # the 2 before the header and the 2 at the end, none inside


def test_jsonl_values_of_the_wrong_type_are_skipped_with_their_line(tmp_path: Path) -> None:
    import json

    def row(i: int, **extra: object) -> str:
        return json.dumps({"product_id": f"p{i}", "title": f"shirt {i}", **extra})

    bad = [
        row(1, attributes={"colour": ["red", "blue"]}),  # first data row: a bad value, not a wrong --format
        row(2, attributes={"colour": {"name": "black"}}),
        row(3, attributes={"new": False}),
        row(4, tags=[None]),
        row(5, tags=["sale", {"a": 1}]),
        row(6, price=-5),
        row(7, price="-5"),
        row(8, price=True),
        row(9, description={"x": 1}),
        json.dumps({"product_id": True, "title": "shirt 10"}),
    ]
    good = [
        row(11 + i, attributes={"size": 42, "fit": None, "colour": "Red"}, tags=["sale"], price=5) for i in range(10)
    ]
    path = write(tmp_path, "c.jsonl", bad + good)
    res = load_catalog(path, "jsonl")
    r = res.report
    assert len(res.products) == 10 and r.rows_read == 20
    assert res.products[0].attributes == {"size": "42", "colour": "Red"} and res.products[0].tags == ("sale",)
    assert r.skipped == Counter(bad_attributes=3, bad_tags=2, bad_price=3, bad_description=1, bad_product_id=1), (
        r.skipped
    )
    lines = {(e["line"], e["reason"]) for e in r.examples}
    assert {(1, "bad_attributes"), (4, "bad_tags"), (6, "bad_price"), (7, "bad_price"), (10, "bad_product_id")} <= lines


def test_cleaning_normalises_and_dedupes() -> None:
    assert clean_text("  ＡＢＣ\u3000１２３\x0e  x ") == "ABC 123 x"
    assert normalize_text("ＡＢＣ  Def") == "abc def"

    def p(i: int, title: str, path: tuple[str, ...], **attrs: str) -> tuple[int, CatalogProduct]:
        return i, CatalogProduct(f"p-{i}", title, category_path=path, attributes=dict(attrs))

    rows = [
        p(1, "Red Shirt", ("A", "B")),
        p(2, "ＲＥＤ  shirt", ("A", "B")),  # exact duplicate after normalisation
        p(3, "Blue Jeans", ("A", "C"), colour="Blue"),
        p(4, "blue jeans", ("A", "C"), colour="Navy"),
        p(5, "BLUE JEANS", ("A", "D"), colour="Green"),  # path majority A/C, colour 3-way tie → dropped
        p(6, "Tie Title", ("X", "Y")),
        p(7, "tie title", ("X", "Z")),  # tie on the path → both dropped
        p(8, "", ("A", "B")),
        p(9, "Brand ", ("A", "")),
    ]
    report = DataReport()
    out = clean_products(rows, report)
    assert [q.product_id for q in out] == ["p-1", "p-3"]
    assert out[1].category_path == ("A", "C") and out[1].attributes == {}
    assert report.skipped["duplicate"] == 1
    assert report.skipped["duplicate_conflict_tie"] == 2
    assert report.skipped["duplicate_conflict_merged"] == 2
    assert report.skipped["empty_title"] == 1 and report.skipped["empty_category_level"] == 1
    assert report.duplicate_conflicts_resolved == 1 and report.duplicate_conflicts_dropped == 1


def test_a_title_made_only_of_invisible_characters_is_an_empty_title() -> None:
    """Word joiners, soft hyphens and variation selectors show nothing: such a title was trained on as a product with
    no words. It is skipped as empty; the same characters inside a title are removed without splitting words."""
    rows = [
        (1, CatalogProduct("p-1", "\u2060\u00ad\ufe0f", category_path=("A",))),
        (2, CatalogProduct("p-2", "\u3164", category_path=("A",))),
        (3, CatalogProduct("p-3", "co\u00adoperative Cotton\u2060 Shirt", category_path=("A",))),
    ]
    report = DataReport()
    out = clean_products(rows, report)
    assert [q.title for q in out] == ["cooperative Cotton Shirt"]
    assert report.skipped["empty_title"] == 2


def test_attribute_majority() -> None:
    rows = [
        (1, CatalogProduct("p-1", "Jeans", category_path=("A",), attributes={"colour": "Blue"})),
        (2, CatalogProduct("p-2", "jeans", category_path=("A",), attributes={"colour": "Blue"})),
        (3, CatalogProduct("p-3", "JEANS", category_path=("B",), attributes={"colour": "Navy"})),
    ]
    report = DataReport()
    out = clean_products(rows, report)
    assert len(out) == 1 and out[0].category_path == ("A",) and out[0].attributes == {"colour": "Blue"}


def _catalog(n_per: dict[str, int], sources: int = 7) -> list[CatalogProduct]:
    out = []
    for leaf, n in n_per.items():
        for i in range(n):
            out.append(
                CatalogProduct(f"{leaf}-{i}", f"t {leaf} {i}", category_path=("R", leaf), source=f"s{i % sources}")
            )
    return out


def test_stratified_split() -> None:
    prods = _catalog({"a": 100, "b": 50, "c": 10, "rare": 2})
    sp = stratified_split(prods, validation=0.1, test=0.2, seed=3)
    all_idx = np.concatenate([sp.train_idx, sp.validation_idx, sp.test_idx])
    assert sorted(all_idx.tolist()) == list(range(len(prods)))
    test_counts = Counter(p.category_path[1] for p in sp.test)
    assert test_counts["a"] == 20 and test_counts["b"] == 10 and test_counts["c"] == 2
    assert Counter(p.category_path[1] for p in sp.validation)["a"] == 10
    assert all(p.category_path[1] == "rare" for p in sp.train if p.category_path[1] == "rare")
    assert Counter(p.category_path[1] for p in sp.train)["rare"] == 2
    again = stratified_split(prods, validation=0.1, test=0.2, seed=3)
    assert np.array_equal(again.test_idx, sp.test_idx)
    other = stratified_split(prods, validation=0.1, test=0.2, seed=4)
    assert not np.array_equal(other.test_idx, sp.test_idx)
    three = stratified_split(_catalog({"x": 3}), validation=0.1, test=0.1)
    assert three.sizes() == {"train": 1, "validation": 1, "test": 1}


def test_group_split_holds_out_whole_sources() -> None:
    prods = _catalog({"a": 200, "b": 100}, sources=20)
    prods += [CatalogProduct(f"n-{i}", f"no source {i}", category_path=("R", "a")) for i in range(10)]
    sp = group_split(prods, validation=0.1, test=0.2, seed=1)
    parts = [{p.source for p in part} for part in (sp.train, sp.validation, sp.test)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert all(p.source is not None for p in sp.test + sp.validation)
    assert 0.1 <= len(sp.test) / len(prods) <= 0.25
    assert sum(sp.sizes().values()) == len(prods)


# ---------------------------------------------------------------- fuzzing review: every bad input is counted or
# refused in one line, never a traceback or a silently wrong product


def _one_line_error(excinfo: pytest.ExceptionInfo[DataError]) -> str:
    msg = str(excinfo.value)
    assert len(msg.splitlines()) == 1 and len(msg) < 500, msg
    return msg


def _jsonl(tmp_path: Path, *rows: str, good: int = 6) -> Path:
    """JSON rows, then `good` valid ones (so a file of bad rows stays under the malformed limit)."""
    valid = [f'{{"product_id": "ok{i}", "title": "valid shirt {i}"}}' for i in range(good)]
    return write(tmp_path, "c.jsonl", [*rows, *valid])


def _skips(res: object) -> dict[int, str]:
    return {e["line"]: e["reason"] for e in res.report.examples if e["kind"] == "skipped"}  # type: ignore[attr-defined]


def test_jsonl_too_deep_or_too_long_numbers_are_invalid_json_rows(tmp_path: Path) -> None:
    deep = '{"product_id": "d", "title": "x", "tags": ' + "[" * 5000 + "]" * 5000 + "}"
    bigint = '{"product_id": "b", "title": "x", "price": ' + "9" * 5000 + "}"
    res = load_catalog(_jsonl(tmp_path, '{"product_id": "a", "title": "first"}', deep, bigint), "jsonl")
    assert _skips(res) == {2: "invalid_json", 3: "invalid_json"}
    assert len(res.products) == 7


def test_lone_surrogates_are_skipped_as_not_unicode(tmp_path: Path) -> None:
    rows = [
        '{"product_id": "s1", "title": "shirt \\ud800"}',
        '{"product_id": "s2", "title": "shirt", "attributes": {"colour": "red \\udfff"}}',
        '{"product_id": "s3", "title": "shirt", "attributes": {"\\ud800": "red"}}',
        '{"product_id": "s4", "title": "shirt", "tags": ["\\ud800"]}',
        '{"product_id": "s5", "title": "shirt", "category_path": ["A", "\\ud800"]}',
        '{"product_id": "s6\\ud800", "title": "shirt"}',
        '{"product_id": "s7", "title": "shirt", "brand": "\\ud83d"}',
        '{"product_id": "s8", "title": "smile \\ud83d\\ude00"}',  # a valid pair is one character: kept
    ]
    res = load_catalog(_jsonl(tmp_path, *rows), "jsonl")
    assert res.report.skipped == Counter(not_unicode=7)
    assert res.products[0].title == "smile \U0001f600"
    json.dumps(res.report.to_dict(), ensure_ascii=False).encode("utf-8")  # the report can be written


def _zip(tmp_path: Path, members: dict[str, str], name: str = "styles.csv.zip", **kw: int) -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", **kw) as z:
        for member, text in members.items():
            z.writestr(member, text)
    return path


def _patch_zip(path: Path, offset_local: int, offset_central: int, value: int) -> Path:
    """Set a 2-byte field of the (only) member in both the local and the central header."""
    data = bytearray(path.read_bytes())
    central = data.index(b"PK\x01\x02")
    data[offset_local : offset_local + 2] = data[central + offset_central : central + offset_central + 2] = (
        value.to_bytes(2, "little")
    )
    path.write_bytes(bytes(data))
    return path


def test_myntra_zip_that_is_corrupt_truncated_encrypted_or_unsupported_is_one_line_error(tmp_path: Path) -> None:
    text = "\n".join(MYNTRA * 20) + "\n"
    good = _zip(tmp_path, {"styles.csv": text}, compression=zipfile.ZIP_DEFLATED).read_bytes()
    corrupt = bytearray(good)
    corrupt[60:90] = bytes(range(30))  # inside the deflate stream
    cases = {
        "corrupt.zip": bytes(corrupt),
        "truncated.zip": good[: len(good) // 2],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=rf"{name}: corrupt or truncated zip") as e:
            load_catalog(tmp_path / name, "myntra")
        _one_line_error(e)
    encrypted = _patch_zip(_zip(tmp_path, {"styles.csv": text}, "enc.zip"), 6, 8, 0x1)
    with pytest.raises(DataError, match=r"enc\.zip: zip member 'styles.csv' is encrypted") as e:
        load_catalog(encrypted, "myntra")
    unsupported = _patch_zip(_zip(tmp_path, {"styles.csv": text}, "method.zip"), 8, 10, 99)
    with pytest.raises(DataError, match=r"method\.zip: zip member uses an unsupported compression method") as e:
        load_catalog(unsupported, "myntra")


def test_header_that_is_not_csv_is_one_line_error(tmp_path: Path) -> None:
    huge = "id," + "x" * 140_000
    for fmt in ("myntra", "bigbasket"):
        with pytest.raises(DataError, match=r"line 1: header is not valid CSV \(field larger than field limit") as e:
            load_catalog(write(tmp_path, "h.csv", [huge, *MYNTRA[1:]]), fmt)
        _one_line_error(e)


def test_cr_line_ends_with_one_stray_lf_and_a_stray_cr_in_an_lf_file(tmp_path: Path) -> None:
    path = tmp_path / "mac.csv"  # old Mac line ends and one LF: every line is a line
    path.write_bytes(("\r".join(MYNTRA[:4]) + "\n" + "\r".join(MYNTRA[4:6]) + "\r").encode())
    res = load_catalog(path, "myntra")
    assert [p.product_id for p in res.products] == ["myntra-15970", "myntra-23124", "myntra-7491", "myntra-30991"]
    assert res.report.rows_read == 5 and _skips(res) == {6: "empty_title"}
    path.write_bytes(("\n".join(JD_ROWS[:3]).replace("跑步鞋 黑色", "跑步鞋\r黑色") + "\n").encode())
    res = load_catalog(path, "cn-jd")  # a lone CR in an LF file is text: the lines (JD's ids) keep their numbers
    assert [p.product_id for p in res.products] == ["jd-1", "jd-2", "jd-3"]
    assert res.products[0].title == "ERKE/鸿星尔克 跑步鞋 黑色 37"
    path.write_bytes(("\n".join([MYNTRA[0].replace("year,", "year\r,"), *MYNTRA[1:]]) + "\n").encode())
    with pytest.raises(DataError, match=r"line 1: header is not valid CSV \(new-line character seen") as e:
        load_catalog(path, "myntra")
    _one_line_error(e)


def _myntra_row(i: int, title: str = "", **cols: str) -> str:
    f = {"gender": "Men", "master": "Apparel", "sub": "Topwear", "article": "Shirts"} | cols
    return f"{i},{f['gender']},{f['master']},{f['sub']},{f['article']},Blue,Fall,2011,Casual,{title or f'Shirt {i}'}"


def test_myntra_records_glued_by_a_lost_line_break_are_skipped(tmp_path: Path) -> None:
    rows = [
        MYNTRA[0],
        _myntra_row(1),
        _myntra_row(2) + _myntra_row(3),  # "Shirt 23,Men,Apparel,…,Shirt 3"
        _myntra_row(9) + "\r" + _myntra_row(10),  # a lone CR in an LF file is text, not a line end
        _myntra_row(4, "Tie, Cufflink and Pocket Square Combo Set") + _myntra_row(5, "Liv,Laugh,Love Flip-flops"),
        _myntra_row(6, "Myntra Men's Take my advice, I don't use it anyway Black T-shirt"),
        _myntra_row(7, "Converse Unisex Navy Blue Liv,Laugh,Love Flip-flops"),
        _myntra_row(8),
    ]
    res = load_catalog(write(tmp_path, "styles.csv", rows), "myntra")
    assert _skips(res) == {3: "concatenated_records", 4: "concatenated_records", 5: "concatenated_records"}
    titles = {p.product_id: p.title for p in res.products}
    assert titles["myntra-6"] == "Myntra Men's Take my advice, I don't use it anyway Black T-shirt"
    assert titles["myntra-7"] == "Converse Unisex Navy Blue Liv,Laugh,Love Flip-flops"
    assert res.report.repaired["unquoted_comma_in_title"] == 2


def test_myntra_header_must_be_all_ten_columns(tmp_path: Path) -> None:
    swapped = MYNTRA[0].replace("usage,productDisplayName", "productDisplayName,usage")
    with pytest.raises(DataError, match=r"line 1: header column 9 is 'productDisplayName', expected 'usage'") as e:
        load_catalog(write(tmp_path, "a.csv", [swapped, *MYNTRA[1:]]), "myntra")
    _one_line_error(e)
    with pytest.raises(DataError, match=r"line 1: header has 11 columns, expected 10"):
        load_catalog(write(tmp_path, "b.csv", [MYNTRA[0] + ",link", *MYNTRA[1:]]), "myntra")
    with pytest.raises(DataError, match=r"line 1: header has 9 columns, expected 10"):
        load_catalog(write(tmp_path, "c.csv", [MYNTRA[0].rsplit(",", 1)[0], *MYNTRA[1:]]), "myntra")


def test_myntra_zip_with_several_csv_members_is_refused(tmp_path: Path) -> None:
    text = "\n".join(MYNTRA) + "\n"
    with pytest.raises(DataError, match=r"zip holds 2 \.csv members and none is styles\.csv .*'a\.csv', 'b\.csv'"):
        load_catalog(_zip(tmp_path, {"a.csv": text, "b.csv": text}), "myntra")
    with pytest.raises(DataError, match=r"zip holds 2 styles\.csv members"):
        load_catalog(_zip(tmp_path, {"x/styles.csv": text, "styles.csv": text}), "myntra")
    assert len(load_catalog(_zip(tmp_path, {"export.csv": text, "readme.txt": ""}), "myntra").products) == 4
    assert len(load_catalog(_zip(tmp_path, {"a.csv": "", "data/styles.csv": text}), "myntra").products) == 4


def test_duplicate_source_ids_are_skipped_in_myntra_and_bigbasket(tmp_path: Path) -> None:
    myn = [MYNTRA[0], _myntra_row(1, "Blue Shirt"), _myntra_row(2), _myntra_row(1, "Red Heels", master="Footwear")]
    res = load_catalog(write(tmp_path, "styles.csv", myn), "myntra")
    assert [p.title for p in res.products] == ["Blue Shirt", "Shirt 2"] and _skips(res) == {4: "duplicate_product_id"}
    res = load_catalog(_bb(tmp_path, {}).with_name("bb.csv"), "bigbasket")
    path = tmp_path / "bb.csv"
    path.write_text(path.read_text() + "3,Other Product,Cat,Sub,Brand,10,12,Type,4.0,desc\n", encoding="utf-8")
    res = load_catalog(path, "bigbasket")
    assert len(res.products) == 8 and _skips(res) == {10: "duplicate_product_id"}


def test_bigbasket_continuation_line_that_starts_like_a_record_is_joined(tmp_path: Path) -> None:
    res = load_catalog(_bb(tmp_path, {2: '"Pack of\n12, Red"', 5: '"Pizza Pan 10 Round', 6: 'TV 32" LED'}), "bigbasket")
    titles = {p.product_id: p.title for p in res.products}
    assert titles["bigbasket-2"] == "Pack of 12, Red" and "bigbasket-12" not in titles
    assert titles["bigbasket-6"] == 'TV 32" LED'  # a whole line with a stray quote does not swallow the next record
    assert _skips(res) == {7: "unterminated_quote"} and res.report.rows_read == 8


def test_jsonl_values_of_the_wrong_type_are_not_taken_for_absent(tmp_path: Path) -> None:
    def row(i: int, key: str, value: str) -> str:
        return f'{{"product_id": "w{i}", "title": "shirt {i}", "{key}": {value}}}'

    bad = {
        "category_path": ["false", "0", '""', "{}"],
        "attributes": ["[]", '""', "false"],
        "tags": ['""', "false"],
    }
    rows = [row(10 * k + j, key, v) for k, (key, values) in enumerate(bad.items()) for j, v in enumerate(values)]
    absent = [row(100 + j, key, "null") for j, key in enumerate(bad)] + ['{"product_id": "w200", "title": "bare"}']
    res = load_catalog(_jsonl(tmp_path, *rows, *absent, good=10), "jsonl")
    assert res.report.skipped == Counter(bad_category_path=4, bad_attributes=3, bad_tags=2)
    kept = {p.product_id: p for p in res.products}
    assert {"w100", "w101", "w102", "w200"} <= set(kept) and kept["w100"].category_path == ()


def test_prices_take_commas_only_as_thousands_separators(tmp_path: Path) -> None:
    prices = ["1,250.50", "1,000", "12,50", "1_000", "₹220", "1,2345", "12.5.0", "١٢٣", "-5"]
    rows = [f'{{"product_id": "p{i}", "title": "shirt {i}", "price": "{v}"}}' for i, v in enumerate(prices)]
    res = load_catalog(_jsonl(tmp_path, *rows, good=8), "jsonl")
    assert [p.price for p in res.products[:2]] == [1250.5, 1000.0]
    assert res.report.skipped == Counter(bad_price=7)
    rows = [BB_HEADER, *(f'{i},P{i},Cat,Sub,Brand,"{v}",12,Type,4.0,desc' for i, v in enumerate(prices, 1))]
    good = [f"{i},P{i},Cat,Sub,B,10,12,T,4,d" for i in range(20, 28)]
    res = load_catalog(write(tmp_path, "bb.csv", [*rows, *good]), "bigbasket")
    assert [p.price for p in res.products[:2]] == [1250.5, 1000.0] and res.report.skipped["bad_price"] == 7


def test_jd_title_with_a_gt_sign_is_not_taken_for_a_breadcrumb(tmp_path: Path) -> None:
    rows = [
        "1005009004,电脑|配件|转换器,Type-C>HDMI 转换器 4K,电脑>配件>转换器>Type-C...,京东商城,店",
        "1005009004,电脑|配件|转换器,A>B>C 三口转换器,电脑>配件>转换器>A>B>C...,京东商城,店",
        "1025002006,出版物|图书|小说,图书>小说>中国当代小说,滚打人生,京东商城,",
    ]
    res = load_catalog(write(tmp_path, "products.csv", rows), "cn-jd")
    assert [p.title for p in res.products] == ["Type-C>HDMI 转换器 4K", "A>B>C 三口转换器", "滚打人生"]
    assert res.report.repaired["title_breadcrumb_swapped"] == 1


def test_bad_value_in_the_first_data_row_is_a_skip_not_a_wrong_format(tmp_path: Path) -> None:
    bb = [BB_HEADER, "1,P1,Cat,Sub,Brand,₹220,220,Type,4.0,desc", *(f"{i},P{i},Cat,Sub,B,10,12,T,4,d" for i in (2, 3))]
    assert _skips(load_catalog(write(tmp_path, "bb.csv", bb), "bigbasket")) == {2: "bad_price"}
    myn = [MYNTRA[0], _myntra_row(1, master="NA"), _myntra_row(2), _myntra_row(3)]
    assert _skips(load_catalog(write(tmp_path, "styles.csv", myn), "myntra")) == {2: "missing_category"}
    jd = ["1005009003,运动,标题,服饰内衣>运动,京东商城,店", *JD_ROWS[:3]]
    assert _skips(load_catalog(write(tmp_path, "products.csv", jd), "cn-jd")) == {1: "bad_category_path"}
    for value, reason in [
        ('"title": 5', "bad_title"),
        ('"title": "t", "category_path": 5', "bad_category_path"),
        ('"title": "t", "tags": [1]', "bad_tags"),
        ('"title": "t", "attributes": {"a": [1]}', "bad_attributes"),
        ('"title": "t", "price": "abc"', "bad_price"),
        ('"product_id": "x y", "title": "t"', "bad_product_id"),
    ]:
        first = "{" + (value if "product_id" in value else f'"product_id": "f", {value}') + "}"
        assert _skips(load_catalog(_jsonl(tmp_path, first), "jsonl")) == {1: reason}, value
    # the shape of the first rows, all of them, still tells a wrong --format
    with pytest.raises(DataError, match=r"line 1: not_an_object: list \(the only data row .*wrong --format\?\)"):
        load_catalog(_jsonl(tmp_path, "[1, 2]", good=0), "jsonl")
    shapeless = write(tmp_path, "styles.csv", [MYNTRA[0], *["1,Men,Apparel"] * 5, *MYNTRA[1:4]])
    with pytest.raises(DataError, match=r"line 2: too_few_fields: 3 fields, need 10 \(the first 5 data rows do not"):
        load_catalog(shapeless, "myntra")


def test_one_shapeless_first_row_before_good_ones_is_skipped_not_a_wrong_format(tmp_path: Path) -> None:
    good = [f'{{"product_id": "g{i}", "title": "Blue shirt {i}", "category_path": ["Apparel"]}}' for i in range(6)]
    truncated = '{"product_id": "x1", "title": "bro'  # a partial write
    result = load_catalog(_jsonl(tmp_path, truncated, *good, good=0), "jsonl")
    assert len(result.products) == 6 and _skips(result) == {1: "invalid_json"}
    [example] = result.report.examples
    assert example["detail"] == "Unterminated string starting at column 31"  # not "starting at at"
    shapeless = write(tmp_path, "styles.csv", [MYNTRA[0], "1,Men,Apparel", *MYNTRA[1:4]])
    assert _skips(load_catalog(shapeless, "myntra")) == {2: "too_few_fields"}


def test_a_catalog_appended_to_itself_loads_its_products_once(tmp_path: Path) -> None:
    rows = [f'{{"product_id": "g{i}", "title": "Blue shirt {i}", "category_path": ["Apparel"]}}' for i in range(4)]
    result = load_catalog(_jsonl(tmp_path, *rows, *rows, *rows, good=0), "jsonl")  # not "8 of 12 rows malformed"
    assert [p.product_id for p in result.products] == ["g0", "g1", "g2", "g3"]
    assert result.report.skipped == {"duplicate_product_id": 8}


@pytest.mark.parametrize(
    ("magic", "hint"),
    [(b"\x1f\x8b\x08\x00", "a gzip file; decompress it first"), (b"PK\x03\x04\xff", "a zip archive; unpack it")],
)
def test_a_compressed_catalog_is_named_as_such(tmp_path: Path, magic: bytes, hint: str) -> None:
    (tmp_path / "catalog.jsonl").write_bytes(magic + b"\xff\xfe" * 20)
    with pytest.raises(DataError, match=rf"line 1: not UTF-8 text \(.*\): {hint}"):
        load_catalog(tmp_path / "catalog.jsonl", "jsonl")


def test_messages_and_details_are_one_short_line(tmp_path: Path) -> None:
    header = "id,gender,ma\x0esterCategory" + "y" * 5000 + ",subCategory"
    with pytest.raises(DataError, match=r"line 1: header column 3 is 'ma\\x0esterCategoryy+\.\.\.y+', expected") as e:
        load_catalog(write(tmp_path, "styles.csv", [header, *MYNTRA[1:]]), "myntra")
    _one_line_error(e)
    bb = [
        BB_HEADER,
        '1,P1,Cat,Sub,Brand,"2\n20",12,Type,4.0,desc',
        *(f"{i},P{i},Cat,Sub,B,10,12,T,4,d" for i in (2, 3)),
    ]
    rows = [
        '{"product_id": "a\\nb", "title": "t"}',
        '{"product_id": "c", "title": "t", "tags": "' + "\\u2028" * 3000 + '"}',
    ]
    with pytest.raises(DataError) as e:
        load_catalog(_jsonl(tmp_path, *rows, good=0), "jsonl")
    assert "'a\\nb'" in _one_line_error(e)
    for res in (
        load_catalog(write(tmp_path, "bb.csv", bb), "bigbasket"),
        load_catalog(_jsonl(tmp_path, *rows), "jsonl"),
    ):
        details = [e["detail"] for e in res.report.examples]
        assert details and all(len(d.splitlines()) == 1 and len(d) <= 160 for d in details), details
    assert details[0] == "'a\\nb'" and details[1].startswith("str '\\u2028")


def test_duplicate_ids_count_only_against_rows_that_are_kept(tmp_path: Path) -> None:
    rows = [
        '{"product_id": "a", "title": ""}',
        '{"product_id": "b", "title": "  \\u3000 "}',
        '{"product_id": "c", "title": "t", "category_path": ["A", " "]}',
        '{"product_id": "a", "title": "Real A"}',
        '{"product_id": "b", "title": "Real B"}',
        '{"product_id": "c", "title": "Real C"}',
        '{"product_id": "a", "title": "Second A"}',
    ]
    res = load_catalog(_jsonl(tmp_path, *rows), "jsonl")
    assert [p.title for p in res.products[:3]] == ["Real A", "Real B", "Real C"]
    assert _skips(res) == {1: "empty_title", 2: "empty_title", 3: "empty_category_level", 7: "duplicate_product_id"}


def test_a_whole_file_error_names_the_file_without_a_line_number(tmp_path: Path) -> None:
    """Before: "<file>: line 0: ..." for errors of the file as a whole."""
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    cases = [
        (empty, "jsonl", f"{empty}: no product rows (0 rows read)"),
        (empty, "xml", f"{empty}: unknown format 'xml' (choose from bigbasket, cn-jd, jsonl, myntra)"),
        (tmp_path, "jsonl", f"{tmp_path}: is a directory, not a catalog file"),
        (tmp_path / "nope.jsonl", "jsonl", f"no such file: {tmp_path / 'nope.jsonl'}"),  # as `train` says it
    ]
    for path, fmt, expected in cases:
        with pytest.raises(DataError) as e:
            load_catalog(path, fmt)
        assert str(e.value) == expected
