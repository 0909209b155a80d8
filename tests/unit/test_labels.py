"""training.labels: hierarchical category tags, attribute groups, minimum support, matrices, labels.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tagstream.errors import DataError
from training.catalog import CatalogProduct
from training.cleaning import DataReport, clean_products
from training.labels import (
    CATEGORY_GROUPS,
    Label,
    LabelGroup,
    LabelMap,
    build_label_map,
    category_tags,
)


def _p(i: int, path: tuple[str, ...], **attrs: str) -> CatalogProduct:
    return CatalogProduct(f"p{i}", f"title {i}", category_path=path, attributes=dict(attrs))


PRODUCTS = (
    [_p(i, ("手机通讯", "手机", "手机"), baseColour="Black") for i in range(6)]
    + [_p(10 + i, ("手机通讯", "手机配件", "数据线"), baseColour="White") for i in range(6)]
    + [
        _p(20 + i, ("Apparel", "Topwear", "Shirts"), baseColour="Navy Blue", gender="Men", year="2012")
        for i in range(6)
    ]
    + [_p(30 + i, ("Apparel", "Bottomwear", "Jeans"), baseColour="Blue", gender="Women") for i in range(5)]
    + [_p(40, ("Apparel", "Bottomwear", "Rare Leaf"), baseColour="Mauve", gender="Men")]  # below min support
)


@pytest.fixture(scope="module")
def lm() -> LabelMap:
    return build_label_map(PRODUCTS, min_support=3)


def test_category_tags() -> None:
    assert category_tags(("手机通讯", "手机", "手机")) == [
        "category:手机通讯",
        "category:手机通讯/手机",
        "category:手机通讯/手机/手机",
    ]
    assert category_tags(("A", "B/C")) == ["category:A", "category:A/B／C"]  # "/" inside a level is replaced
    assert category_tags(("A", "B", "C", "D")) == ["category:A", "category:A/B", "category:A/B/C"]
    assert category_tags(()) == []


def test_every_level_becomes_a_tag_and_parents_link(lm: LabelMap) -> None:
    tags = {lab.tag: lab for lab in lm.labels}
    for p in PRODUCTS[:-1]:
        for depth, tag in enumerate(category_tags(p.category_path)):
            assert tag in tags
            assert tags[tag].group == CATEGORY_GROUPS[depth]
    for lab in lm.labels:
        if lab.group in CATEGORY_GROUPS[1:]:
            assert lab.parent == lab.tag.rsplit("/", 1)[0]
            assert tags[lab.parent].group == CATEGORY_GROUPS[CATEGORY_GROUPS.index(lab.group) - 1]
        elif lab.group == "category_l1":
            assert lab.parent is None
        else:
            assert lab.parent is None
    groups = {g.name: g for g in lm.groups}
    assert groups["category_l1"].parent_group is None
    assert groups["category_l2"].parent_group == "category_l1"
    assert groups["category_leaf"].parent_group == "category_l2"
    assert all(g.kind == "exclusive" for g in lm.groups)


def test_attribute_groups_names_and_prefixes(lm: LabelMap) -> None:
    names = lm.group_names
    assert names[:3] == list(CATEGORY_GROUPS)
    assert {"colour", "gender"} <= set(names) and "baseColour" not in names  # SPEC §1: one group, `colour`
    assert "year" not in names  # excluded by default
    assert "colour:Navy Blue" in lm and "colour:Black" in lm  # baseColour values get the readable `colour:` prefix
    assert lm.labels[lm.index("colour:Navy Blue")].group == "colour"
    assert lm.labels[lm.index("gender:Men")].group == "gender"


def test_min_support_drops_rare_labels_and_unlabels(lm: LabelMap) -> None:
    assert "category:Apparel/Bottomwear/Rare Leaf" not in lm
    assert "colour:Mauve" not in lm
    y = lm.encode([PRODUCTS[-1]])
    gi = {g: i for i, g in enumerate(lm.group_names)}
    assert y.mask[0, gi["category_l2"]] and not y.mask[0, gi["category_leaf"]]
    assert y.targets["category_leaf"][0] == -1
    assert not y.mask[0, gi["colour"]]
    assert y.mask[0, gi["gender"]]
    assert lm.support["category:手机通讯"] == 12


def test_labels_contiguous_per_group_and_matrix(lm: LabelMap) -> None:
    sl = lm.slices()
    assert list(sl) == lm.group_names
    prev = 0
    for s, e in sl.values():
        assert s == prev and e > s
        prev = e
    assert prev == len(lm)
    y = lm.encode(PRODUCTS)
    assert y.y.shape == (len(PRODUCTS), len(lm)) and y.y.dtype == np.float32
    for g, (s, e) in sl.items():  # exclusive: at most one label per group, and target agrees with y
        block = y.y[:, s:e]
        assert block.sum(axis=1).max() <= 1
        t = y.targets[g]
        lab = t >= 0
        assert np.all(block[lab, t[lab]] == 1)
        assert np.all(block[~lab].sum(axis=1) == 0)


def test_labels_json_round_trip(lm: LabelMap, tmp_path) -> None:
    obj = lm.to_json()
    assert obj["format_version"] == 1
    assert set(obj["groups"][0]) == {"name", "kind", "parent_group"}
    assert set(obj["labels"][0]) == {"index", "tag", "group", "value", "parent"}
    assert [x["index"] for x in obj["labels"]] == list(range(len(lm)))
    lm.save(tmp_path / "labels.json")
    back = LabelMap.load(tmp_path / "labels.json")
    assert back.to_json() == obj


def test_multi_label_tags_group() -> None:
    ps = [
        CatalogProduct(f"t{i}", "x", category_path=("A",) if i % 2 else ("B",), tags=("organic",) * (i % 3 == 0))
        for i in range(12)
    ]
    lm = build_label_map(ps, min_support=2)
    assert lm.group("tags").kind == "multi" and "organic" in lm
    y = lm.encode(ps)
    assert y.y[0, lm.index("organic")] == 1 and y.y[1, lm.index("organic")] == 0


def test_errors() -> None:
    with pytest.raises(DataError):
        build_label_map([])
    with pytest.raises(DataError):
        build_label_map([_p(1, ("A",))], min_support=5)
    with pytest.raises(DataError):
        LabelMap.from_json({"format_version": 2, "groups": [], "labels": []})


# ---------------------------------------------------------------- a catalog of one top-level category


ONE_DEPARTMENT = [  # a shoe shop: one L1, two L2, four leaves (the first 2,000 JD rows look like this)
    _p(i, ("运动户外", "运动鞋" if i % 2 else "运动服", f"款{i % 4}"), colour="Black" if i % 3 else "White")
    for i in range(40)
]


def test_a_catalog_of_one_top_level_category_still_learns_its_sub_categories() -> None:
    # before: the one-label category_l1 was dropped and took category_l2 and category_leaf with it
    lm = build_label_map(ONE_DEPARTMENT, min_support=3)
    assert lm.group_names[:3] == list(CATEGORY_GROUPS)
    assert [lab.tag for lab in lm.labels if lab.group == "category_l1"] == ["category:运动户外"]
    assert {lab.parent for lab in lm.labels if lab.group == "category_l2"} == {"category:运动户外"}
    assert len([lab for lab in lm.labels if lab.group == "category_leaf"]) == 4
    y = lm.encode(ONE_DEPARTMENT)
    assert (y.targets["category_l1"] == 0).all() and (y.targets["category_leaf"] >= 0).all()


def test_the_single_top_level_category_is_emitted_with_a_consistent_path() -> None:
    from serving.bundle import Thresholds
    from serving.decoding import TagDecoder

    lm = build_label_map(ONE_DEPARTMENT, min_support=3)
    decoder = TagDecoder(lm.bundle_labels(), Thresholds(0.5, {}))
    scores = np.zeros((1, len(lm)), np.float32)
    scores[0, lm.index("category:运动户外")] = 1.0  # a softmax over one label
    scores[0, lm.index("category:运动户外/运动鞋")] = 0.8
    scores[0, lm.index("category:运动户外/运动鞋/款1")] = 0.7
    scores[0, lm.index("colour:Black")] = 0.9
    tags = [t.tag for t in decoder.decode(scores)[0]]
    assert tags == ["category:运动户外", "category:运动户外/运动鞋", "category:运动户外/运动鞋/款1", "colour:Black"]


def test_a_catalog_whose_groups_all_have_one_label_says_so() -> None:
    # before: "no label reaches the minimum support of 5 products", although category:A is on 30 products
    with pytest.raises(DataError) as err:
        build_label_map([_p(i, ("A",)) for i in range(30)], min_support=5)
    assert "single label (category_l1: category:A on 30 products)" in str(err.value)
    assert "a group needs at least 2 labels" in str(err.value)
    with pytest.raises(DataError, match="no label reaches the minimum support of 5 products"):
        build_label_map([_p(i, (f"A{i}",)) for i in range(30)], min_support=5)


def test_one_label_levels_below_the_last_level_with_two_are_dropped() -> None:
    products = [_p(i, ("A", "B0", "C") if i % 2 else ("A", "B1")) for i in range(20)]  # two L2 labels, one leaf
    lm = build_label_map(products, min_support=3)
    assert lm.group_names == ["category_l1", "category_l2"]  # the leaf level teaches nothing: no leaf group
    assert [lab.tag for lab in lm.labels] == ["category:A", "category:A/B0", "category:A/B1"]


def test_unknown_tags_names_the_labels_a_map_cannot_output(lm: LabelMap) -> None:
    products = [
        _p(1, ("Apparel", "Topwear", "Shirts"), baseColour="Navy Blue", gender="Men"),
        _p(2, ("Footwear", "Shoes"), baseColour="Mauve", gender="Men"),
        _p(3, ("Apparel", "Bottomwear", "Rare Leaf")),
    ]
    unknown = lm.unknown_tags(products)
    assert unknown["category_l1"] == [None, "category:Footwear", None]
    assert unknown["category_l2"] == [None, "category:Footwear/Shoes", None]
    assert unknown["category_leaf"] == [None, None, "category:Apparel/Bottomwear/Rare Leaf"]
    assert unknown["colour"] == [None, "colour:Mauve", None] and unknown["gender"] == [None, None, None]


# ---------------------------------------------------------------- group names built from catalog attributes


def _catalog(n: int = 24, **attrs_by_parity: tuple[str, str]) -> list[CatalogProduct]:
    """`n` products over two category paths; each keyword names an attribute with (even value, odd value)."""
    return [
        CatalogProduct(
            f"p{i}",
            f"title {i}",
            category_path=("Clothing", "Shirts") if i % 2 else ("Shoes", "Boots"),
            attributes={name: values[i % 2] for name, values in attrs_by_parity.items()},
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("name", ["category_l1", "category_l2", "category_leaf", "tags", "category", "Category_L1"])
def test_an_attribute_named_like_a_builtin_group_is_refused_in_one_line(name: str) -> None:
    # before: `category_l1` made a second group of that name, and training failed only at export
    with pytest.raises(DataError, match="reserved") as exc:
        build_label_map(_catalog(**{name: ("X", "Y")}), min_support=3)
    msg = str(exc.value)
    assert f"attribute {name!r}" in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("colour", "Colour"),
        ("gender", "ｇｅｎｄｅｒ"),
        ("usage", "USAGE"),
        ("colour", "baseColour"),
        ("color", "colour"),
    ],
)
def test_attribute_names_that_differ_only_in_case_width_or_colour_alias_are_refused(first: str, second: str) -> None:
    products = _catalog(**{first: ("X", "Y")})
    products += [
        CatalogProduct(
            f"q{i}", f"other {i}", category_path=("Shoes", "Boots"), attributes={second: "Z" if i % 2 else "W"}
        )
        for i in range(10)
    ]
    with pytest.raises(DataError, match="one attribute") as exc:
        build_label_map(products, min_support=3)
    assert repr(first) in str(exc.value) and repr(second) in str(exc.value)


def test_excluded_or_empty_attributes_are_not_checked_and_distinct_names_pass() -> None:
    products = _catalog(year=("2012", "2013"), gender=("Men", "Women"), colour=("Red", "Blue"))
    products[0].attributes["tags"] = " "  # no value: no group
    lm = build_label_map(products, min_support=3)
    assert lm.group_names == ["category_l1", "category_l2", "colour", "gender"]
    assert build_label_map(products, min_support=3, exclude_attributes=()).group_names[-1] == "year"


def test_a_label_map_with_two_groups_of_one_name_is_refused() -> None:
    groups = [LabelGroup("category_l1", "exclusive", None), LabelGroup("category_l1", "exclusive", None)]
    labels = [Label(0, "category:A", "category_l1", "A", None), Label(1, "category_l1:X", "category_l1", "X", None)]
    with pytest.raises(DataError, match="two groups named 'category_l1'"):
        LabelMap(groups, labels)
    with pytest.raises(DataError, match="'category:A' twice"):
        LabelMap(groups[:1], [labels[0], Label(1, "category:A", "category_l1", "A", None)])


def test_train_refuses_a_reserved_attribute_name_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import training.train
    from tagstream.cli import main
    from tagstream.synth import write_jsonl

    def no_fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started")

    monkeypatch.setattr(training.train, "fit", no_fit)
    catalog = tmp_path / "catalog.jsonl"
    write_jsonl(_catalog(40, category_l1=("X", "Y")), catalog)
    code = main(["train", "--catalog", str(catalog), "--format", "jsonl", "--out", str(tmp_path / "models")])
    assert code == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("tagstream ")]
    assert len(lines) == 1 and lines[0].startswith("tagstream train: error: attribute 'category_l1'"), lines
    assert "reserved" in lines[0]


# ---------------------------------------------------------------- the data report counts what training uses


def _report(rows: list[CatalogProduct]) -> tuple[DataReport, list[CatalogProduct]]:
    report = DataReport()
    products = clean_products(list(enumerate(rows, 1)), report)
    return report, products


def test_the_data_report_cuts_category_paths_to_the_3_levels_training_uses() -> None:
    # before: a category_l3 group of A/B/C and the 4th level counted as category_leaf
    report, _ = _report([_p(1, ("A", "B", "C", "D0")), _p(2, ("A", "B", "C", "D1")), _p(3, ("A", "B", "E"))])
    assert list(report.label_counts) == ["category_l1", "category_l2", "category_leaf"]
    assert report.label_counts["category_leaf"] == {"category:A/B/C": 2, "category:A/B/E": 1}


def test_the_data_report_keeps_a_slash_inside_a_level_apart_like_training() -> None:
    # before: ("A/B", "C") and ("A", "B/C") were both counted as the one label A/B/C
    report, _ = _report([_p(1, ("A/B", "C")), _p(2, ("A", "B/C")), _p(3, ("A", "B", "C"))])
    assert report.label_counts["category_l2"] == {"category:A／B/C": 1, "category:A/B／C": 1, "category:A/B": 1}
    assert report.label_counts["category_leaf"] == {"category:A/B/C": 1}


def test_the_data_report_counts_exactly_the_labels_training_uses() -> None:
    rows = [
        _p(1, ("A", "B", "C", "D0"), colour="Red", year="2012"),  # year: not a label (excluded by default)
        _p(2, ("A", "B", "C", "D1"), colour="Red"),
        _p(3, ("A/B", "C"), colour="Blue"),
        _p(4, ("A", "B/C"), colour="Blue"),
        _p(5, ("A", "B", "E")),
        CatalogProduct("p6", "title 6", category_path=("A",), tags=("organic", "organic", "vegan")),
    ]
    report, products = _report(rows)
    counts = report.label_counts
    assert list(counts) == ["category_l1", "category_l2", "category_leaf", "colour", "tags"]
    assert counts["category_l1"] == {"category:A": 5, "category:A／B": 1}
    assert counts["tags"] == {"organic": 1, "vegan": 1}
    # label for label, the support the label map gives each tag (min_support 1 keeps every label)
    lm = build_label_map(products, min_support=1)
    assert {lab.tag: lm.support[lab.tag] for lab in lm.labels} == {t: c for g in counts.values() for t, c in g.items()}
    assert report.to_dict()["n_labels"] == {
        "category_l1": 2,
        "category_l2": 3,
        "category_leaf": 2,
        "colour": 2,
        "tags": 2,
    }


def test_attribute_names_equal_after_cleaning_are_one_attribute() -> None:
    rows = [
        CatalogProduct("p1", "a", category_path=("A",), attributes={"colour": "Red", " colour ": "Red"}),
        CatalogProduct("p2", "b", category_path=("A",), attributes={"colour": "Red", "colour\u200b": "Blue"}),
        CatalogProduct("p3", "c", category_path=("A",), attributes={"colour": "Red", "colour ": " "}),
    ]
    report = DataReport()
    p1, p2, p3 = clean_products(list(enumerate(rows, 1)), report)
    assert p1.attributes == {"colour": "Red"}
    assert p2.attributes == {}  # two values for one name: neither is kept (before: the last one silently won)
    assert p3.attributes == {"colour": "Red"}  # before: the blank value replaced Red and the attribute was lost
    assert report.repaired == {"attribute_name_conflict": 1}
