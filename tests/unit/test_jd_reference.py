"""bench/jd_reference.py: the JD baseline read naively (breadcrumbs as titles) against the loader's reading."""

from __future__ import annotations

import json
from pathlib import Path

from bench.jd_reference import baseline_by_top_level, main, read_naive
from training.loaders import load_catalog

# bare book names: nothing in them tells a printed book from an e-book
_PRINTED = ["春风", "长河", "远山", "旧梦", "孤城", "星海", "归途", "白夜", "秋水", "南岭", "北望", "西窗"]
_EBOOKS = ["晚钟", "青石", "落雪", "故园", "明镜", "野火", "松涛", "冬至", "渔歌", "残阳", "花间", "古道"]


def _jd_catalog(root: Path) -> Path:
    """A cn-jd file: shoes with real titles, and publications whose rows have breadcrumb and title swapped."""
    rows = []
    for i in range(12):
        rows.append(f"1,健康运动、户外|运动鞋|跑步鞋,鸿星尔克 男式跑步鞋 款{i},服饰内衣>运动>跑步鞋>款{i},京东商城,店A")
        rows.append(f"2,健康运动、户外|运动鞋|足球鞋,耐克 足球鞋 碎钉 款{i},服饰内衣>运动>足球鞋>款{i},京东商城,店B")
        rows.append(f"3,出版物|图书|文艺,图书>文学>小说,{_PRINTED[i]},京东商城,")
        rows.append(f"4,出版物|电子书|文艺,首页>电子书>小说>{_EBOOKS[i]},{_EBOOKS[i]},京东商城,")
    path = root / "cn-products-jd" / "products.csv"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def test_the_naive_reading_takes_the_swapped_breadcrumbs_for_titles(tmp_path: Path) -> None:
    path = _jd_catalog(tmp_path) / "cn-products-jd" / "products.csv"
    naive, breadcrumbs = read_naive(path)
    # every book row's "title" is its breadcrumb; the printed books share one, so all but one are dropped as duplicates
    assert breadcrumbs == 1 + 12 and len(naive) == 24 + 1 + 12
    assert all(p.title.startswith(("图书>", "首页>")) for p in naive if p.category_path[0] == "出版物")
    loaded = load_catalog(path, "cn-jd")
    assert loaded.report.repaired["title_breadcrumb_swapped"] == 24
    assert {p.title for p in loaded.products if p.category_path[0] == "出版物"} >= {"春风", "晚钟"}


def test_publications_are_easy_only_through_their_breadcrumbs(tmp_path: Path) -> None:
    path = _jd_catalog(tmp_path) / "cn-products-jd" / "products.csv"
    naive = baseline_by_top_level(read_naive(path)[0], seed=0)
    loaded = baseline_by_top_level(load_catalog(path, "cn-jd").products, seed=0)
    # the breadcrumb names the medium, a bare book name does not
    assert naive["by_top_level"]["出版物"]["accuracy"] == 1.0
    assert loaded["by_top_level"]["出版物"]["accuracy"] < 1.0
    # the shoes read the same either way, and "all but 出版物" is exactly them
    for reading in (naive, loaded):
        shoes, rest = reading["by_top_level"]["健康运动、户外"], reading["by_top_level"]["all but 出版物"]
        assert shoes == rest and shoes["accuracy"] == 1.0
        assert reading["leaf"]["n"] == shoes["n"] + reading["by_top_level"]["出版物"]["n"]


def test_the_command_prints_both_readings_and_writes_json(tmp_path: Path, capsys) -> None:
    out = tmp_path / "reference.json"
    assert main(["--data", str(_jd_catalog(tmp_path)), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "naive" in printed and "loader" in printed and "24 rows repaired" in printed
    figures = json.loads(out.read_text(encoding="utf-8"))
    assert figures["naive"]["breadcrumb_as_title"] == 13 and figures["loader"]["repaired"] == 24
