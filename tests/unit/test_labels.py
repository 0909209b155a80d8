"""training.labels: hierarchical category tags, attribute groups, minimum support, matrices, labels.json."""

from __future__ import annotations

import numpy as np
import pytest

from tagstream.errors import DataError
from training.catalog import CatalogProduct
from training.labels import (
    CATEGORY_GROUPS,
    LabelMap,
    build_label_map,
    category_tags,
)


def _p(i: int, path: tuple[str, ...], **attrs: str) -> CatalogProduct:
    return CatalogProduct(f"p{i}", f"title {i}", category_path=path, attributes=dict(attrs))


PRODUCTS = (
    [_p(i, ("手机通讯", "手机", "手机"), colour="Black") for i in range(6)]
    + [_p(10 + i, ("手机通讯", "手机配件", "数据线"), colour="White") for i in range(6)]
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
    assert {"baseColour", "colour", "gender"} <= set(names)
    assert "year" not in names  # excluded by default
    assert "colour:Navy Blue" in lm and "colour:Black" in lm  # baseColour values get the readable `colour:` prefix
    assert lm.labels[lm.index("colour:Navy Blue")].group == "baseColour"
    assert lm.labels[lm.index("gender:Men")].group == "gender"


def test_min_support_drops_rare_labels_and_unlabels(lm: LabelMap) -> None:
    assert "category:Apparel/Bottomwear/Rare Leaf" not in lm
    assert "colour:Mauve" not in lm
    y = lm.encode([PRODUCTS[-1]])
    gi = {g: i for i, g in enumerate(lm.group_names)}
    assert y.mask[0, gi["category_l2"]] and not y.mask[0, gi["category_leaf"]]
    assert y.targets["category_leaf"][0] == -1
    assert not y.mask[0, gi["baseColour"]]
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
