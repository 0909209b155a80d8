"""The label map (SPEC §2 labels.json) and label matrices built from CatalogProducts (no TensorFlow here).

Groups, in column order:

- ``category_l1``, ``category_l2``, ``category_leaf`` (exclusive; each level's parent group is the level above):
  the tag of level i is ``category:`` + the first i levels joined by ``/`` and its parent is the tag of level i-1.
  Paths deeper than 3 levels keep their first 3 (the leaf). A ``/`` inside one level's name is replaced by ``／``
  so that "parent = path minus its last level" stays true.
- one exclusive group per product attribute, named by the attribute key as the catalog gives it (``gender``,
  ``colour``/``baseColour``, ``season``, ``usage``...): tag ``<prefix>:<value>`` where the prefix is the attribute
  name, except ``baseColour``/``color`` → ``colour`` (readable tags, SPEC §1).
- ``tags`` (multi-label, sigmoid): the products' free extra tags, when any survive the minimum support.

Minimum support: a label seen on fewer than ``min_support`` products is dropped; products that carried it are
*unlabelled* in that group (masked out of the loss and of evaluation), never merged into a catch-all label. For
categories a dropped level also unlabels the deeper levels of that product (a leaf needs its parent). A group left
with fewer than 2 labels is dropped. Attributes in ``exclude_attributes`` (``year`` by default) are not tagged.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.bundle import Label, LabelGroup
from serving.bundle import LabelMap as BundleLabelMap
from serving.decoding import attribute_tag
from tagstream.errors import DataError, ModelRejectedError
from training.catalog import CatalogProduct

__all__ = [
    "CATEGORY_GROUPS",
    "Label",
    "LabelGroup",
    "LabelMap",
    "LabelMatrix",
    "build_label_map",
    "category_tags",
]

CATEGORY_GROUPS = ("category_l1", "category_l2", "category_leaf")
TAGS_GROUP = "tags"
DEFAULT_EXCLUDE = ("year",)


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
    _by_tag: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_tag = {lab.tag: lab.index for lab in self.labels}
        if len(self._by_tag) != len(self.labels):
            raise DataError("label map has duplicate tags")
        for i, lab in enumerate(self.labels):
            if lab.index != i:
                raise DataError(f"label {lab.tag} has index {lab.index}, expected {i}")

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
        cats = category_tags(p.category_path)
        for g, tag in zip(CATEGORY_GROUPS, cats, strict=False):
            if tag not in self._by_tag:
                break
            out[g].append(tag)
        names = set(self.group_names)
        for name, value in p.attributes.items():
            if name in names and value and (tag := attribute_tag(name, value)) in self._by_tag:
                out[name].append(tag)
        if TAGS_GROUP in names:
            out[TAGS_GROUP] = [t for t in p.tags if t in self._by_tag]
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
) -> LabelMap:
    """The label map of a catalog (see the module doc for groups, names and minimum support)."""
    products = list(products)
    if not products:
        raise DataError("cannot build labels from no products")
    cat_count: Counter[str] = Counter()
    attr_count: dict[str, Counter[str]] = defaultdict(Counter)
    tag_count: Counter[str] = Counter()
    for p in products:
        for tag in category_tags(p.category_path):
            cat_count[tag] += 1
        for name, value in p.attributes.items():
            if name not in exclude_attributes and value and value.strip():
                attr_count[name][value.strip()] += 1
        if include_tags:
            tag_count.update(set(p.tags))

    groups: list[LabelGroup] = []
    labels: list[Label] = []
    support: dict[str, int] = {}

    def add_group(group: LabelGroup, items: list[tuple[str, str, str | None, int]]) -> None:
        if len(items) < 2:
            return
        groups.append(group)
        for tag, value, parent, count in items:
            labels.append(Label(len(labels), tag, group.name, value, parent))
            support[tag] = count

    kept: set[str] = set()
    parent_group: str | None = None
    for depth, gname in enumerate(CATEGORY_GROUPS, start=1):
        items = []
        for tag, count in sorted(cat_count.items()):
            path = tag[len("category:") :].split("/")
            if len(path) != depth or count < min_support:
                continue
            parent = "category:" + "/".join(path[:-1]) if depth > 1 else None
            if parent is not None and parent not in kept:
                continue
            items.append((tag, path[-1], parent, count))
        n_before = len(groups)
        add_group(LabelGroup(gname, "exclusive", parent_group), items)
        if len(groups) == n_before:
            break  # a level without labels ends the hierarchy
        kept.update(t for t, *_ in items)
        parent_group = gname

    for name in sorted(attr_count):
        items = [(attribute_tag(name, v), v, None, c) for v, c in sorted(attr_count[name].items()) if c >= min_support]
        add_group(LabelGroup(name, "exclusive", None), items)

    if include_tags:
        items = [(t, t, None, c) for t, c in sorted(tag_count.items()) if c >= min_support]
        if items and len(items) >= 1:
            groups.append(LabelGroup(TAGS_GROUP, "multi", None))
            for tag, value, parent, count in items:
                labels.append(Label(len(labels), tag, TAGS_GROUP, value, parent))
                support[tag] = count
    if not labels:
        raise DataError(f"no label reaches the minimum support of {min_support} products")
    return LabelMap(groups, labels, support)
