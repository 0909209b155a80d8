"""The label map (SPEC §2 labels.json) and label matrices built from CatalogProducts (no TensorFlow here).

Groups, in column order:

- ``category_l1``, ``category_l2``, ``category_leaf`` (exclusive; each level's parent group is the level above):
  the tag of level i is ``category:`` + the first i levels joined by ``/`` and its parent is the tag of level i-1.
  Paths deeper than 3 levels keep their first 3 (the leaf). A ``/`` inside one level's name is replaced by ``／``
  so that "parent = path minus its last level" stays true.
- one exclusive group per product attribute, named by its tags' prefix (`attribute_group`): tag
  ``<prefix>:<value>`` where the prefix is the attribute name as the catalog gives it (``gender``, ``season``,
  ``usage``...), except ``baseColour``, ``color`` and ``colour`` in any case → ``colour`` (`tag_prefix`, SPEC §1):
  those spellings name one group, ``colour``, in the label map, its matrices, evaluation and the bundle alike, as
  they do in the worker's catalog tags, so a catalog's spelling never matters.
- ``tags`` (multi-label, sigmoid): the products' free extra tags, when any survive the minimum support.

`product_labels` lists the (group, tag) pairs of one product before minimum support; the label map counts them, and
so does the data report (`training.cleaning.DataReport.label_counts`), so the two always agree.

Attribute names that would collide with another group are refused (`DataError`, before any training) rather than
renamed: a worker names a catalog tag's group after the attribute as the product event gives it (the ``colour``
aliases applied) and lets it replace the model's tags of that group (SPEC §1, `serving.decoding.merge_tags`), so a
renamed group would not match it.
Names are compared by `attribute_key` (NFKC, case and white space folded, the ``colour`` aliases applied):

- ``category``, ``category_l1``, ``category_l2``, ``category_leaf`` and ``tags`` are reserved (the category groups,
  the ``category:`` tag prefix and the free tags group);
- two attribute names with one key (``Colour`` and ``colour``, ``colour`` and ``baseColour``) would be one
  attribute split over two groups: the catalog must use one name.

Free tags are refused the same way (`check_tag_names`) when named like a behaviour tag (``trending``, ``hot``,
``high-conversion``, ``new``: `serving.behaviour.BEHAVIOUR_TAGS`, ignoring case and width): the worker keeps one tag
per name, so a model tag of that name would stand in for the behaviour tag when its window turns it off. So is a
free tag containing ``:``, the shape of attribute and category tags (``colour:Red``, ``category:A``): it would
collide with the catalog's attribute tag of that name, and a catalog value would not replace it (it is in group
``tags``, not the attribute's group).

Minimum support: a label seen on fewer than ``min_support`` products is dropped; products that carried it are
*unlabelled* in that group (masked out of the loss and of evaluation), never merged into a catch-all label. For
categories a dropped level also unlabels the deeper levels of that product (a leaf needs its parent). A group left
with fewer than 2 labels is dropped (with a warning), except a category level above a deeper level of 2 labels or
more: its one label is the parent of those, so a catalog of a single top-level category still learns (and tags) its
sub-categories, each product's path starting with that category (a softmax over one label always scores 1).
Attributes in ``exclude_attributes`` (``year`` by default), compared ignoring case and width (`is_excluded`), are
not tagged (the data report names them). `build_label_map` says which groups it left out, and why, in
`LabelMap.warnings` (the data report's warnings, through metrics.json `label_warnings`); a catalog with no label at
all is refused with that said.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.behaviour import BEHAVIOUR_TAGS
from serving.bundle import Label, LabelGroup
from serving.bundle import LabelMap as BundleLabelMap
from serving.decoding import attribute_tag, group_key, tag_prefix
from serving.featurizer import normalize_text
from tagstream.errors import DataError, ModelRejectedError
from training.catalog import CatalogProduct

__all__ = [
    "CATEGORY_GROUPS",
    "Label",
    "LabelGroup",
    "LabelMap",
    "LabelMatrix",
    "attribute_group",
    "attribute_key",
    "build_label_map",
    "category_tags",
    "check_attribute_names",
    "check_tag_names",
    "is_excluded",
    "product_labels",
]

log = logging.getLogger(__name__)

CATEGORY_GROUPS = ("category_l1", "category_l2", "category_leaf")
TAGS_GROUP = "tags"
DEFAULT_EXCLUDE = ("year",)
CATEGORY_PREFIX = "category"
RESERVED_NAMES = (CATEGORY_PREFIX, *CATEGORY_GROUPS, TAGS_GROUP)


def _level(value: str) -> str:
    return value.strip().replace("/", "／")


def category_tags(path: Sequence[str]) -> list[str]:
    """The category tags of a path, root first: ["category:A", "category:A/B", "category:A/B/C"]."""
    levels = [_level(v) for v in path[: len(CATEGORY_GROUPS)]]
    out: list[str] = []
    for i in range(len(levels)):
        if not levels[i]:
            break
        out.append("category:" + "/".join(levels[: i + 1]))
    return out


def product_labels(
    p: CatalogProduct, *, exclude_attributes: Sequence[str] = DEFAULT_EXCLUDE, include_tags: bool = True
) -> list[tuple[str, str]]:
    """(group, tag) of every label the product carries, before minimum support: its category tags (at most 3
    levels, `category_tags`), one tag per attribute with a non-blank value (group = `attribute_group`: ``color`` →
    ``colour``) unless excluded, and with `include_tags` its free tags (group ``tags``, each once)."""
    out = list(zip(CATEGORY_GROUPS, category_tags(p.category_path), strict=False))
    out += [
        (attribute_group(name), attribute_tag(name, value))
        for name, value in p.attributes.items()
        if value and value.strip() and not is_excluded(name, exclude_attributes)
    ]
    if include_tags:
        out += [(TAGS_GROUP, t) for t in dict.fromkeys(p.tags)]
    return out


@functools.lru_cache(maxsize=4096)
def _key(name: str) -> str:
    return group_key(name)


@functools.lru_cache(maxsize=64)
def _excluded_keys(exclude_attributes: tuple[str, ...]) -> frozenset[str]:
    return frozenset(_key(e) for e in exclude_attributes)


def is_excluded(name: str, exclude_attributes: Sequence[str] = DEFAULT_EXCLUDE) -> bool:
    """Whether attribute `name` is one of `exclude_attributes`, compared as attribute names are (`attribute_key`:
    ignoring case, width and spaces): ``Year`` and ``YEAR`` are ``year``."""
    return bool(exclude_attributes) and _key(name) in _excluded_keys(tuple(exclude_attributes))


def attribute_group(name: str) -> str:
    """The label group of an attribute: its tags' prefix (`attribute_tag`), so ``baseColour``, ``color`` and
    ``colour`` in any case name the one group ``colour`` (SPEC §1), as the worker names their catalog tags' group."""
    return tag_prefix(name)


def attribute_key(name: str) -> str:
    """What two attribute names are compared by: NFKC, case and white space folded, ``colour`` aliases applied (the
    worker's `group_key`)."""
    return group_key(name)


def check_attribute_names(
    products: Iterable[CatalogProduct], exclude_attributes: Sequence[str] = DEFAULT_EXCLUDE
) -> None:
    """DataError (one line) if an attribute would be tagged under a reserved or an already used group name (see the
    module doc); attributes without a value or excluded make no group and are not checked."""
    reserved = {normalize_text(n): n for n in RESERVED_NAMES}
    names: dict[str, tuple[str, str, int]] = {}  # key -> (first name, first product id, products)
    keys: dict[str, str] = {}
    for p in products:
        for name, value in p.attributes.items():
            if not (value and value.strip()) or is_excluded(name, exclude_attributes):
                continue
            key = keys.get(name) or keys.setdefault(name, attribute_key(name))
            first, pid, n = names.get(key, (name, p.product_id, 0))
            if first != name:
                raise DataError(
                    f"attributes {first!r} (product {pid}) and {name!r} (product {p.product_id}) would be two label "
                    "groups of one attribute (names are compared ignoring case, width and spaces, and baseColour/"
                    "color mean colour): use one name in the catalog"
                )
            names[key] = (first, pid, n + 1)
    for key, (name, pid, n) in names.items():
        if key in reserved:
            raise DataError(
                f"attribute {name!r} (on {n} products, e.g. {pid}) is named like the built-in label group or tag "
                f"prefix {reserved[key]!r}: the names {', '.join(RESERVED_NAMES)} are reserved (ignoring case and "
                "width); rename the attribute in the catalog"
            )


def check_tag_names(products: Iterable[CatalogProduct]) -> None:
    """DataError (one line) if a free tag is named like a behaviour tag (ignoring case and width) or contains ``:``
    (see the module doc), naming the tag, how many products carry it and one of them."""
    behaviour = {normalize_text(t): t for t in BEHAVIOUR_TAGS}
    bad: dict[str, tuple[str, int]] = {}  # tag -> (first product id, products)
    for p in products:
        for tag in dict.fromkeys(p.tags):
            if ":" in tag or normalize_text(tag) in behaviour:
                pid, n = bad.get(tag, (p.product_id, 0))
                bad[tag] = (pid, n + 1)
    for tag, (pid, n) in bad.items():
        if ":" in tag:
            raise DataError(
                f"free tag {tag!r} (on {n} products, e.g. {pid}) contains ':', which names attribute and category "
                "tags (<attribute>:<value>, category:<path>): it would collide with the catalog's attribute tag of "
                "that name, which would not replace it; make it an attribute in the catalog or drop the ':'"
            )
        raise DataError(
            f"free tag {tag!r} (on {n} products, e.g. {pid}) is named like the behaviour tag "
            f"{behaviour[normalize_text(tag)]!r} (ignoring case and width): the names {', '.join(BEHAVIOUR_TAGS)} "
            "are reserved for the worker's behaviour tags, which it turns on and off; rename or drop the tag in the "
            "catalog"
        )


@dataclass(slots=True)
class LabelMatrix:
    """Training targets: multi-hot `y` [N, T] and per-group `target` [N] (label index in group, -1 = unlabelled)."""

    y: np.ndarray  # float32 [N, T]
    targets: dict[str, np.ndarray]  # group -> int64 [N] (exclusive groups: position inside the group; -1 missing)
    mask: np.ndarray  # bool [N, G]: product labelled in group g

    def take(self, index: np.ndarray) -> LabelMatrix:
        """The rows at `index`."""
        return LabelMatrix(self.y[index], {g: t[index] for g, t in self.targets.items()}, self.mask[index])


@dataclass(slots=True)
class LabelMap:
    """Groups and labels (contiguous per group, in group order); index = column of `scores`."""

    groups: list[LabelGroup]
    labels: list[Label]
    support: dict[str, int] = field(default_factory=dict)
    # what `build_label_map` left out that a user should know (a group of one label, or of none with enough support)
    warnings: list[str] = field(default_factory=list)
    _by_tag: dict[str, int] = field(default_factory=dict, repr=False)
    _by_key: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise DataError(f"label map has two groups named {', '.join(map(repr, twice))}")
        self._by_tag = {}
        for lab in self.labels:
            if lab.tag in self._by_tag:
                other = self.labels[self._by_tag[lab.tag]].group
                raise DataError(f"label map has the tag {lab.tag!r} twice: in group {other!r} and in {lab.group!r}")
            self._by_tag[lab.tag] = lab.index
        for i, lab in enumerate(self.labels):
            if lab.index != i:
                raise DataError(f"label {lab.tag} has index {lab.index}, expected {i}")
        # attribute labels by (group key, value): a catalog and a map (an older bundle's: `Colour:Red` in group
        # `Colour`) may spell one attribute differently; the worker compares the groups by `group_key` too
        self._by_key = {
            (group_key(lab.group), lab.value): lab.index for lab in self.labels if lab.group not in CATEGORY_GROUPS
        }

    def _attribute_label(self, group: str, tag: str) -> Label | None:
        """The map's label of a product's attribute tag (`product_labels`' group and tag), however either spells
        the attribute's name."""
        index = self._by_key.get((group_key(group), tag[len(group) + 1 :]))
        return None if index is None else self.labels[index]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def group_names(self) -> list[str]:
        """Group names in column order."""
        return [g.name for g in self.groups]

    def group(self, name: str) -> LabelGroup:
        """The group called `name` (KeyError if absent)."""
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def slices(self) -> dict[str, tuple[int, int]]:
        """group → (start, end) column range."""
        out: dict[str, tuple[int, int]] = {}
        for lab in self.labels:
            s, _ = out.get(lab.group, (lab.index, lab.index))
            out[lab.group] = (s, lab.index + 1)
        return {g.name: out[g.name] for g in self.groups}

    def index(self, tag: str) -> int:
        """Column of `tag` (KeyError if absent)."""
        return self._by_tag[tag]

    def __contains__(self, tag: object) -> bool:
        return tag in self._by_tag

    def product_tags(self, p: CatalogProduct) -> dict[str, list[str]]:
        """group → the product's known tags in that group (after minimum support)."""
        out: dict[str, list[str]] = defaultdict(list)
        names = set(self.group_names)
        labels = product_labels(p, exclude_attributes=())
        for g, tag in labels[: len(CATEGORY_GROUPS)]:
            if g not in CATEGORY_GROUPS or tag not in self._by_tag:
                break  # a level the map does not know ends the path
            out[g].append(tag)
        for g, tag in labels:
            # the map's label of the tag, matched by `group_key` and value: a map (or an older bundle's, which named
            # the group as its catalog spelled it: `color`, `Colour`) and a catalog may spell one attribute differently
            if g in CATEGORY_GROUPS or g == TAGS_GROUP:
                if g == TAGS_GROUP and tag in self._by_tag:
                    out[g].append(tag)
                continue
            lab = self._attribute_label(g, tag)
            if lab is not None:
                out[lab.group].append(lab.tag)
        if TAGS_GROUP in names:
            out.setdefault(TAGS_GROUP, [])
        return out

    def unknown_tags(self, products: Sequence[CatalogProduct]) -> dict[str, list[str | None]]:
        """Exclusive group → per product, the tag it carries in that group that the map does not know (a label below
        the minimum support or unseen in training: the model cannot output it), None when it carries none or a known
        one. `encode` leaves such products unlabelled; evaluation counts them as misses."""
        exclusive = {group_key(g.name): g.name for g in self.groups if g.kind == "exclusive"}
        out: dict[str, list[str | None]] = {g: [None] * len(products) for g in exclusive.values()}
        for i, p in enumerate(products):
            for g, tag in product_labels(p, exclude_attributes=(), include_tags=False):
                group = exclusive.get(group_key(g))  # the map's name of the group (see `product_tags`)
                if g in CATEGORY_GROUPS:
                    lab = self.labels[self._by_tag[tag]] if tag in self._by_tag else None
                else:
                    lab = self._attribute_label(g, tag)
                if group is not None and (lab is None or lab.group != group):
                    out[group][i] = tag
        return out

    def encode(self, products: Sequence[CatalogProduct]) -> LabelMatrix:
        """Label matrices for these products."""
        n, t = len(products), len(self.labels)
        names = self.group_names
        slices = self.slices()
        gi = {g: i for i, g in enumerate(names)}
        y = np.zeros((n, t), dtype=np.float32)
        mask = np.zeros((n, len(names)), dtype=bool)
        targets = {g.name: np.full(n, -1, dtype=np.int64) for g in self.groups if g.kind == "exclusive"}
        for i, p in enumerate(products):
            for g, tags in self.product_tags(p).items():
                if not tags:
                    continue
                for tag in tags:
                    y[i, self._by_tag[tag]] = 1.0
                mask[i, gi[g]] = True
                if g in targets:
                    targets[g][i] = self._by_tag[tags[0]] - slices[g][0]
        if TAGS_GROUP in gi:
            mask[:, gi[TAGS_GROUP]] = True  # multi-label: a missing tag is a negative
        return LabelMatrix(y, targets, mask)

    def bundle_labels(self) -> BundleLabelMap:
        """The same labels as the bundle's (serving) label map, which owns the labels.json format."""
        return BundleLabelMap(tuple(self.groups), tuple(self.labels))

    def to_json(self) -> dict[str, Any]:
        """The labels.json object (SPEC §2)."""
        return self.bundle_labels().to_json()

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> LabelMap:
        """Parse (and check, as a worker would) a labels.json object."""
        try:
            parsed = BundleLabelMap.from_json(obj)
        except ModelRejectedError as exc:
            raise DataError(f"invalid labels.json: {'; '.join(exc.reasons)}") from exc
        return cls(list(parsed.groups), list(parsed.labels))

    def save(self, path: str | Path) -> None:
        """Write labels.json."""
        Path(path).write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> LabelMap:
        """Read labels.json."""
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def build_label_map(
    products: Iterable[CatalogProduct],
    *,
    min_support: int = 5,
    exclude_attributes: Sequence[str] = DEFAULT_EXCLUDE,
    include_tags: bool = True,
    names_checked: bool = False,
    catalog_size: int | None = None,
) -> LabelMap:
    """The label map of a catalog (see the module doc for groups, names and minimum support). `names_checked`: the
    caller already ran `check_attribute_names` (with `exclude_attributes`) and `check_tag_names` on these products or
    more (a catalog of which they are the training part), so they are not run again. `catalog_size`: how many
    products the catalog has when `products` are only part of it, what the error of a catalog without labels says."""
    products = list(products)
    if not products:
        raise DataError("cannot build labels from no products")
    if not names_checked:
        check_attribute_names(products, exclude_attributes)
        if include_tags:
            check_tag_names(products)
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for p in products:
        for group, tag in product_labels(p, exclude_attributes=exclude_attributes, include_tags=include_tags):
            counts[group][tag] += 1
    near = _case_or_width_twins(counts)
    tag_count = counts.pop(TAGS_GROUP, Counter())
    cat_counts = [counts.pop(g, Counter()) for g in CATEGORY_GROUPS]

    groups: list[LabelGroup] = []
    labels: list[Label] = []
    support: dict[str, int] = {}

    single: list[str] = []  # groups dropped for having one label: what the error says when nothing is left
    dropped: list[str] = []  # why each group of the catalog is not in the map (`LabelMap.warnings`)

    def add_group(group: LabelGroup, items: list[tuple[str, str, str | None, int]], *, min_labels: int = 2) -> None:
        if len(items) < min_labels:
            if len(items) == 1:
                single.append(f"{group.name}: {items[0][0]} on {items[0][3]} products")
                dropped.append(
                    f"label group {group.name} dropped: its only label is {items[0][0]} (on {items[0][3]} products), "
                    "nothing to learn"
                )
            else:
                dropped.append(
                    f"label group {group.name} dropped: none of its labels is on TAGSTREAM_MIN_SUPPORT={min_support} "
                    "products or more"
                )
            log.warning("%s", dropped[-1])
            return
        groups.append(group)
        for tag, value, parent, count in items:
            labels.append(Label(len(labels), tag, group.name, value, parent))
            support[tag] = count

    levels: list[list[tuple[str, str, str | None, int]]] = []
    kept: set[str] = set()
    if not any(cat_counts) and not any(counts.values()) and not tag_count:
        which = (
            f"its {len(products)} products"
            if catalog_size is None or catalog_size == len(products)
            else f"the {len(products)} products it trains on (training and validation; {catalog_size} in the catalog)"
        )
        raise DataError(
            f"the catalog has no labels: none of {which} has a category path, an attribute or a free tag (in JSONL "
            "the keys category_path, attributes and tags; see the log for keys it ignored)"
        )
    for depth, cat_count in enumerate(cat_counts, start=1):
        items = []
        for tag, count in sorted(cat_count.items()):
            path = tag[len(CATEGORY_PREFIX) + 1 :].split("/")
            if count < min_support:
                continue
            parent = "category:" + "/".join(path[:-1]) if depth > 1 else None
            if parent is not None and parent not in kept:
                continue
            items.append((tag, path[-1], parent, count))
        if not items:
            if cat_count:
                dropped.append(
                    f"label group {CATEGORY_GROUPS[depth - 1]} dropped: none of its labels is on "
                    f"TAGSTREAM_MIN_SUPPORT={min_support} products or more under a kept parent"
                )
                log.warning("%s", dropped[-1])
            break  # a level without labels ends the hierarchy
        levels.append(items)
        kept.update(t for t, *_ in items)
    # a level with one label teaches nothing, but its tag is the parent of the levels below it: it is kept above a
    # deeper level with 2 labels or more (a catalog of one department still learns its sub-categories), and the
    # deepest levels are dropped while they have fewer than 2 labels
    informative = max((i for i, items in enumerate(levels) if len(items) >= 2), default=-1)
    parent_group: str | None = None
    for i, (gname, items) in enumerate(zip(CATEGORY_GROUPS, levels, strict=False)):
        add_group(LabelGroup(gname, "exclusive", parent_group), items, min_labels=1 if i < informative else 2)
        parent_group = gname

    for name in sorted(counts):  # the attributes (one tag prefix per group: sorted by tag = sorted by value)
        cut = len(name) + 1  # the group is its tags' prefix (`attribute_group`)
        items = [(tag, tag[cut:], None, c) for tag, c in sorted(counts[name].items()) if c >= min_support]
        add_group(LabelGroup(name, "exclusive", None), items)

    if include_tags:
        items = [(t, t, None, c) for t, c in sorted(tag_count.items()) if c >= min_support]
        if items and len(items) >= 1:
            groups.append(LabelGroup(TAGS_GROUP, "multi", None))
            for tag, value, parent, count in items:
                labels.append(Label(len(labels), tag, TAGS_GROUP, value, parent))
                support[tag] = count
        elif tag_count:
            dropped.append(
                f"label group {TAGS_GROUP} dropped: none of its free tags is on TAGSTREAM_MIN_SUPPORT={min_support} "
                "products or more"
            )
            log.warning("%s", dropped[-1])
    if not labels and single:
        raise DataError(
            f"nothing to learn: every label group reaching the minimum support of {min_support} products has a "
            f"single label ({', '.join(single)}); a group needs at least 2 labels"
        )
    if not labels:
        raise DataError(f"no label reaches the minimum support of {min_support} products")
    return LabelMap(groups, labels, support, dropped + near)


def _case_or_width_twins(counts: dict[str, Counter[str]]) -> list[str]:
    """A warning per label group whose labels include some that differ only in case or width (`Blue`, `blue`,
    `Ｂｌｕｅ`): they are separate labels, which the catalog may not mean (the model then splits their products)."""
    import unicodedata

    out = []
    for group in sorted(counts):
        same: defaultdict[str, list[str]] = defaultdict(list)
        for tag in counts[group]:
            same[unicodedata.normalize("NFKC", tag).casefold()].append(tag)
        twins = [sorted(tags) for tags in same.values() if len(tags) > 1]
        if twins:
            shown = "; ".join(" / ".join(tags) for tags in sorted(twins)[:3])
            more = f" and {len(twins) - 3} more" if len(twins) > 3 else ""
            out.append(f"label group {group}: labels differing only in case or width are separate: {shown}{more}")
            log.warning("%s", out[-1])
    return out
