"""Tag decoding: thresholds, exclusive groups, hierarchy consistency, catalog override, diff."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from schemas.records import SourceRef, Tag, TagUpdate
from serving.bundle import LabelMap, Thresholds
from serving.decoding import TagDecoder, catalog_tags, diff_tags, merge_tags, tags_from_json, tags_to_json
from tagstream.errors import ConfigError, ScoringError
from tests.tinymodel import DEFAULT_LABELS

LABELS = LabelMap.from_json(DEFAULT_LABELS)
COLUMNS = [x.tag for x in LABELS.labels]
PHONE, CLOTHING = "category:手机通讯", "category:Clothing"
HANDSET, ACCESSORY, SHIRTS = "category:手机通讯/手机", "category:手机通讯/配件", "category:Clothing/Shirts"


def row(**scores: float) -> np.ndarray:
    """A score row; keys are tags with ':' '/' ' ' spelled as given in `ALIASES`."""
    out = np.zeros(len(COLUMNS), dtype=np.float32)
    for alias, value in scores.items():
        out[COLUMNS.index(ALIASES[alias])] = value
    return out


ALIASES = {
    "phone": PHONE,
    "clothing": CLOTHING,
    "handset": HANDSET,
    "accessory": ACCESSORY,
    "shirts": SHIRTS,
    "black": "colour:Black",
    "navy": "colour:Navy Blue",
    "casual": "style:casual",
    "sport": "style:sport",
}


def decode(r: np.ndarray, thresholds: Thresholds | None = None) -> dict[str, float]:
    dec = TagDecoder(LABELS, thresholds or Thresholds(default=0.5, per_tag={"style:sport": 0.4}))
    tags = dec.decode_row(r)
    assert all(t.origin == "model" for t in tags)
    return {t.tag: t.score for t in tags}


def test_per_tag_thresholds() -> None:
    got = decode(row(casual=0.45, sport=0.45))
    assert got == {"style:sport": pytest.approx(0.45)}  # sport's threshold is 0.4, casual uses the default 0.5


def test_multi_label_group_emits_every_passing_label() -> None:
    assert set(decode(row(casual=0.9, sport=0.8))) == {"style:casual", "style:sport"}


def test_exclusive_group_emits_only_the_argmax() -> None:
    lenient = Thresholds(default=0.3)
    assert set(decode(row(black=0.45, navy=0.55), lenient)) == {"colour:Navy Blue"}
    assert decode(row(black=0.45, navy=0.4)) == {}  # the argmax does not pass 0.5: nothing


def test_hierarchy_path() -> None:
    got = decode(row(phone=0.9, clothing=0.1, handset=0.6, accessory=0.3, shirts=0.1))
    assert got == {PHONE: pytest.approx(0.9), HANDSET: pytest.approx(0.6)}


def test_child_never_without_parent() -> None:
    # The parent fails its threshold: its child is not emitted however high it scores.
    assert decode(row(phone=0.4, clothing=0.3, handset=0.95)) == {}
    # A child of the other branch is never attached to the chosen parent.
    got = decode(row(phone=0.8, clothing=0.2, shirts=0.9))
    assert got == {PHONE: pytest.approx(0.8)}


def test_best_path_by_product_of_levels() -> None:
    lenient = Thresholds(default=0.3)
    # phone→handset = 0.5·0.35 = 0.175 < clothing→shirts = 0.45·0.44 = 0.198
    got = decode(row(phone=0.5, clothing=0.45, handset=0.35, shirts=0.44), lenient)
    assert set(got) == {CLOTHING, SHIRTS}
    # a branch that cannot go deeper competes with its own score: 0.5 > 0.198
    got = decode(row(phone=0.5, clothing=0.45, handset=0.1, shirts=0.44), lenient)
    assert set(got) == {PHONE}


def test_parent_score_at_least_child_score() -> None:
    got = decode(row(phone=0.6, handset=0.8))
    assert got[PHONE] == pytest.approx(0.8) and got[HANDSET] == pytest.approx(0.8)


def test_decode_batch_and_order() -> None:
    dec = TagDecoder(LABELS, Thresholds())
    scores = np.stack([row(phone=0.9, handset=0.7, navy=0.8, casual=0.6), row()])
    out = dec.decode(scores)
    assert [t.tag for t in out[0]] == [PHONE, HANDSET, "colour:Navy Blue", "style:casual"]  # label index order
    assert out[1] == []
    assert out[0][1] == Tag(HANDSET, "category_l2", pytest.approx(0.7), "model")  # type: ignore[arg-type]


def test_decode_rejects_wrong_width() -> None:
    with pytest.raises(ScoringError):
        TagDecoder(LABELS, Thresholds()).decode(np.zeros((2, 4), dtype=np.float32))


def _wide_labels(seed: int) -> LabelMap:
    """A random label map: a 3-level exclusive hierarchy, an exclusive group under a multi-label group, a flat
    exclusive group and a flat multi-label group."""
    rng = np.random.default_rng(seed)
    groups = [
        {"name": "l1", "kind": "exclusive", "parent_group": None},
        {"name": "l2", "kind": "exclusive", "parent_group": "l1"},
        {"name": "l3", "kind": "exclusive", "parent_group": "l2"},
        {"name": "theme", "kind": "multi", "parent_group": None},
        {"name": "sub", "kind": "exclusive", "parent_group": "theme"},
        {"name": "colour", "kind": "exclusive", "parent_group": None},
        {"name": "style", "kind": "multi", "parent_group": None},
    ]
    labels: list[dict[str, object]] = []

    def add(group: str, parent: str | None) -> str:
        tag = f"{group}:{len(labels)}"
        labels.append({"index": len(labels), "tag": tag, "group": group, "value": str(len(labels)), "parent": parent})
        return tag

    for _ in range(4):
        a = add("l1", None)
        for _ in range(int(rng.integers(1, 4))):
            b = add("l2", a)
            for _ in range(int(rng.integers(1, 5))):
                add("l3", b)
    for _ in range(3):
        t = add("theme", None)
        for _ in range(int(rng.integers(1, 4))):
            add("sub", t)
    for g in ("colour", "style"):
        for _ in range(5):
            add(g, None)
    order = rng.permutation(len(labels))  # label indices need not follow the hierarchy
    for x in labels:
        x["index"] = int(order[int(x["index"])])
    return LabelMap.from_json({"format_version": 1, "groups": groups, "labels": labels})


def _reference_decode(labels: LabelMap, thresholds: Thresholds, row_scores: np.ndarray) -> list[Tag]:
    """The module docstring's rules, one label at a time."""
    by_tag = labels.by_tag
    passes = {x.tag: float(row_scores[x.index]) >= thresholds.for_tag(x.tag) for x in labels.labels}
    kids: dict[str, dict[str, list[str]]] = {}
    for x in labels.labels:
        if x.parent is not None:
            kids.setdefault(x.parent, {}).setdefault(x.group, []).append(x.tag)

    def path_value(tag: str) -> float:
        v = float(row_scores[by_tag[tag].index])
        for group, children in kids.get(tag, {}).items():
            if labels.group_by_name[group].kind == "exclusive":
                passing = [path_value(c) for c in children if passes[c]]
                v *= max(passing) if passing else 1.0
        return v

    emitted: set[str] = set()
    pending = list(labels.groups)
    while pending:
        for g in pending:
            if g.parent_group is None or g.parent_group not in {p.name for p in pending}:
                break
        pending.remove(g)
        members = (x for x in labels.labels if x.group == g.name and passes[x.tag])
        cands = sorted((x for x in members if x.parent is None or x.parent in emitted), key=lambda x: x.index)
        if g.kind == "multi":
            emitted |= {x.tag for x in cands}
        elif cands:
            emitted.add(max(cands, key=lambda x: (path_value(x.tag), -x.index)).tag)
    score = {t: float(row_scores[by_tag[t].index]) for t in emitted}
    for t in sorted(emitted, key=lambda t: -len(_ancestors(labels, t))):
        parent = by_tag[t].parent
        if parent is not None:
            score[parent] = max(score[parent], score[t])
    return [
        Tag(tag=t, group=by_tag[t].group, score=round(min(1.0, max(0.0, score[t])), 6), origin="model")
        for t in sorted(emitted, key=lambda t: by_tag[t].index)
    ]


def _ancestors(labels: LabelMap, tag: str) -> list[str]:
    out, parent = [], labels.by_tag[tag].parent
    while parent is not None:
        out.append(parent)
        parent = labels.by_tag[parent].parent
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_decoding_follows_the_rules_label_by_label(seed: int) -> None:
    labels = _wide_labels(seed)
    rng = np.random.default_rng(seed)
    thresholds = Thresholds(default=0.3, per_tag={x.tag: float(rng.uniform(0.1, 0.6)) for x in labels.labels[::3]})
    scores = (rng.random((400, labels.T)) ** 2).astype(np.float32)
    got = TagDecoder(labels, thresholds).decode(scores)
    for r in range(scores.shape[0]):
        assert got[r] == _reference_decode(labels, thresholds, scores[r]), f"row {r}"
    assert sum(len(tags) for tags in got) > scores.shape[0]  # the rows do emit tags, hierarchies included
    assert any(len(tags) >= 5 for tags in got)


@pytest.mark.parametrize("seed", [3, 4])
def test_tied_scores_and_rows_where_nothing_passes_follow_the_rules(seed: int) -> None:
    """Scores of one decimal (ties between path values: the lowest index wins) and rows in which no label passes."""
    labels = _wide_labels(seed)
    rng = np.random.default_rng(seed)
    thresholds = Thresholds(default=0.5, per_tag={x.tag: 0.2 for x in labels.labels[::4]})
    scores = np.round(rng.random((300, labels.T)), 1).astype(np.float32)
    scores[::7] = 0.0  # nothing passes
    got = TagDecoder(labels, thresholds).decode(scores)
    for r in range(scores.shape[0]):
        assert got[r] == _reference_decode(labels, thresholds, scores[r]), f"row {r}"
    assert got[0] == [] and got[7] == []
    assert sum(len(tags) for tags in got) > scores.shape[0]


def test_decoded_tags_fit_the_tag_update_schema() -> None:
    tags = TagDecoder(LABELS, Thresholds()).decode_row(row(phone=1.0, handset=0.9999999, black=0.7))
    update = TagUpdate(
        product_id="p-1",
        tags=tuple(tags),
        added=tuple(t.tag for t in tags),
        removed=(),
        model_version="20260102T030405Z-8122ca35",
        reason="product-upsert",
        source=SourceRef("products", 0, 5),
        event_time=1,
        emit_time=2,
    )
    assert TagUpdate.decode(orjson.dumps(update.to_dict())).tags == tuple(tags)


# ------------------------------------------------------------------------------------------------ catalog, merge


def test_catalog_tags() -> None:
    tags = catalog_tags({"gender": "Men", "colour": " Navy Blue ", "season": " ", "": "x"})
    assert tags == [
        Tag("colour:Navy Blue", "colour", 1.0, "catalog"),
        Tag("gender:Men", "gender", 1.0, "catalog"),
    ]
    assert catalog_tags(None) == []
    # a value with a line break or a run of spaces: one tag without them, spelled as training spells its labels
    [tag] = catalog_tags({"colour": "Red\nBlue\t  Mix \r\n"})
    assert tag.tag == "colour:Red Blue Mix"


def test_a_catalog_colour_has_the_tag_name_the_model_gives_it() -> None:
    # a Myntra-trained model names `baseColour` values `colour:<value>`: so does a catalog, however it spells it
    for name in ("baseColour", "color", "colour", "COLOR", "BaseColour", "Colour"):
        [tag] = catalog_tags({name: "Navy Blue"})
        assert (tag.tag, tag.group) == ("colour:Navy Blue", "colour")


@pytest.mark.parametrize("model_group", ["colour", "baseColour"])
@pytest.mark.parametrize("catalog_name", ["colour", "baseColour", "Color", "color", "COLOR", "Colour", "BASECOLOUR"])
def test_a_catalog_colour_replaces_the_models_colour_however_either_spells_the_attribute(
    model_group: str, catalog_name: str
) -> None:
    model = [Tag(PHONE, "category_l1", 0.9, "model"), Tag("colour:Blue", model_group, 0.8, "model")]
    merged = merge_tags(model, catalog_tags({catalog_name: "Red"}), [])
    assert [t.tag for t in merged] == [PHONE, "colour:Red"]  # one colour, the catalog's


@pytest.mark.parametrize(
    ("model_group", "catalog_name"), [("gender", "Gender"), ("Gender", "gender"), ("usage", "USAGE")]
)
def test_a_catalog_attribute_replaces_the_models_group_whatever_the_case_of_its_name(
    model_group: str, catalog_name: str
) -> None:
    model = [Tag(PHONE, "category_l1", 0.9, "model"), Tag(f"{model_group}:Women", model_group, 0.8, "model")]
    merged = merge_tags(model, catalog_tags({catalog_name: "Men"}), [])
    assert [t.tag for t in merged] == [PHONE, f"{catalog_name}:Men"]  # one value of the attribute, the catalog's


def test_catalog_beats_model_in_same_group() -> None:
    model = [Tag(PHONE, "category_l1", 0.9, "model"), Tag("colour:Black", "colour", 0.8, "model")]
    behaviour = [Tag("trending", "behaviour", 1.0, "behaviour")]
    merged = merge_tags(model, catalog_tags({"colour": "Navy Blue"}), behaviour)
    assert [(t.tag, t.origin) for t in merged] == [
        (PHONE, "model"),
        ("colour:Navy Blue", "catalog"),
        ("trending", "behaviour"),
    ]


def test_merge_keeps_one_tag_per_name() -> None:
    model = [Tag("colour:Black", "colour", 0.8, "model")]
    catalog = [Tag("colour:Black", "colour", 1.0, "catalog")]
    assert merge_tags(model, catalog, []) == catalog


def test_merge_with_labels_drops_orphaned_children() -> None:
    model = [Tag(PHONE, "category_l1", 0.9, "model"), Tag(HANDSET, "category_l2", 0.8, "model")]
    catalog = catalog_tags({"category_l1": "Books"})
    assert [t.tag for t in merge_tags(model, catalog, [], labels=LABELS)] == ["category_l1:Books"]
    assert [t.tag for t in merge_tags(model, catalog, [])] == [HANDSET, "category_l1:Books"]


# ------------------------------------------------------------------------------------------------ diff


def test_diff_added_removed() -> None:
    old = [Tag("a:1", "a", 0.9, "model"), Tag("b:1", "b", 0.8, "model")]
    new = [Tag("a:1", "a", 0.9, "model"), Tag("c:1", "c", 0.7, "model")]
    assert diff_tags(old, new, 0.05) == (("c:1",), ("b:1",), True)


def test_diff_score_delta() -> None:
    old = [Tag("a:1", "a", 0.50, "model")]
    assert diff_tags(old, [Tag("a:1", "a", 0.53, "model")], 0.05) == ((), (), False)
    assert diff_tags(old, [Tag("a:1", "a", 0.56, "model")], 0.05) == ((), (), True)
    assert diff_tags(old, [Tag("a:1", "a", 0.50, "catalog")], 0.05) == ((), (), True)
    assert diff_tags(old, old, 0.0) == ((), (), False)
    with pytest.raises(ConfigError):
        diff_tags(old, old, -1)


def test_tags_json_round_trip() -> None:
    tags = [Tag("a:1", "a", 0.5, "model"), Tag("hot", "behaviour", 1.0, "behaviour")]
    assert tags_from_json(tags_to_json(tags)) == tags
