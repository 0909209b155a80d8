"""Scores → tags: model tags from a scores matrix, catalog tags from product attributes, merge and diff.

Model decoding rules (per row; `s(x)` is label x's score, `θ(x)` its threshold from thresholds.json, a label
"passes" when s(x) >= θ(x)):

1. Groups are decoded top-down (a group after its `parent_group`). A label is a candidate only if it passes and
   its parent tag (if any) has been emitted, so a child is never emitted without its parent.
2. Multi-label group: every candidate is emitted.
3. Exclusive group: at most one label is emitted — the candidate with the largest *path value*
   V(x) = s(x) · Π over exclusive child groups C of max{V(c) : c in C, parent(c) = x, c passes} (a factor of 1 when
   no child in C passes). In a flat exclusive group V = s, so this is the argmax among passing labels. Down a
   hierarchy it chooses the most probable complete threshold-passing path (product of level probabilities): a branch
   is always followed as deep as thresholds allow, and branches are compared by their products.
4. Emitted scores are made hierarchy-consistent: an emitted parent's score is raised to the largest score of its
   emitted children (a child implies its parent, so P(parent) >= P(child)).

Tags come out in label index order. Catalog tags (`<attribute>:<value>`, group = the attribute, score 1.0) replace
model tags of the same group in `merge_tags`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

import numpy as np

from schemas.records import Tag
from serving.bundle import LabelMap, ModelBundle, Thresholds
from serving.featurizer import normalize_text
from tagstream.errors import ConfigError, ScoringError

__all__ = [
    "TAG_PREFIXES",
    "TagDecoder",
    "attribute_tag",
    "catalog_tags",
    "diff_tags",
    "group_key",
    "merge_tags",
    "tag_prefix",
    "tags_from_json",
    "tags_to_json",
]

# Attribute names whose tags take another prefix, so one colour has one tag name whichever catalog spelled it (the
# trainer's labels and the worker's catalog tags both name tags with `attribute_tag`). Names are looked up ignoring
# case and width (`tag_prefix`): `COLOR` and `BaseColour` are `colour` too.
TAG_PREFIXES = {"baseColour": "colour", "basecolour": "colour", "color": "colour", "Color": "colour"}
_PREFIX_BY_KEY = {normalize_text(name): v for k, v in TAG_PREFIXES.items() for name in (k, v)}


@lru_cache(maxsize=4096)
def tag_prefix(name: str) -> str:
    """The prefix of an attribute's tags: its `TAG_PREFIXES` entry (compared ignoring case and width), else the name."""
    return _PREFIX_BY_KEY.get(normalize_text(name), name)


@lru_cache(maxsize=4096)
def group_key(name: str) -> str:
    """What two attribute or tag-group names are compared by: NFKC, case and white space folded, `TAG_PREFIXES`
    applied (`Gender` and `gender` name one group; `Color`, `baseColour` and `colour` too)."""
    return normalize_text(tag_prefix(name))


_ROOT = -1  # parent key of labels without a parent


class TagDecoder:
    """Decodes score rows of one bundle into model tags (see the module docstring for the rules)."""

    def __init__(self, labels: LabelMap, thresholds: Thresholds) -> None:
        self.labels = labels
        self.thresholds = thresholds
        T = labels.T
        self._tags = [x.tag for x in labels.labels]
        self._groups = [x.group for x in labels.labels]
        self._thr = np.array([thresholds.for_tag(t) for t in self._tags], dtype=np.float32)
        index = {x.tag: x.index for x in labels.labels}
        self._parent = np.array([index[x.parent] if x.parent else _ROOT for x in labels.labels], dtype=np.int64)
        depth = np.zeros(T, dtype=np.int64)
        for i in range(T):
            p = self._parent[i]
            while p != _ROOT:
                depth[i] += 1
                p = self._parent[p]

        # Groups top-down (a group after its parent group); a label's step is its group's place in that order.
        gdepth: dict[str, int] = {}
        for g in labels.groups:
            d, cur = 0, g.parent_group
            while cur is not None:
                d += 1
                cur = labels.group_by_name[cur].parent_group
            gdepth[g.name] = d
        steps = sorted(labels.groups, key=lambda g: gdepth[g.name])
        step_of = {g.name: i for i, g in enumerate(steps)}
        self._step_of: list[int] = [step_of[g] for g in self._groups]
        self._step_exclusive: list[bool] = [g.kind == "exclusive" for g in steps]
        self._step_has_parent: list[bool] = [g.parent_group is not None for g in steps]  # its labels have parents

        # Per label, for the row-by-row pass over the labels that pass (a few of the T in each row): its depth and
        # parent, the exclusive child groups whose best passing path value multiplies its own (in group name
        # order), and the slot (parent, group) its own path value competes for in its parent's.
        self._depth: list[int] = depth.tolist()
        self._parent_of: list[int] = self._parent.tolist()
        self._slot: list[tuple[int, str] | None] = [None] * T
        factor_groups: dict[int, set[str]] = {}
        for x in labels.labels:
            g = labels.group_by_name[x.group]
            if g.kind == "exclusive" and g.parent_group is not None and self._parent[x.index] != _ROOT:
                parent = int(self._parent[x.index])
                self._slot[x.index] = (parent, g.name)
                factor_groups.setdefault(parent, set()).add(g.name)
        self._factors: list[tuple[str, ...]] = [tuple(sorted(factor_groups.get(i, ()))) for i in range(T)]

    @classmethod
    def from_bundle(cls, bundle: ModelBundle) -> TagDecoder:
        """The decoder of a loaded bundle (its labels and thresholds)."""
        return cls(bundle.labels, bundle.thresholds)

    def decode(self, scores: np.ndarray) -> list[list[Tag]]:
        """Model tags for each row of a [N, T] scores matrix: one array comparison with the thresholds, then the rules
        row by row over the labels that pass (a handful of the T: the per-call cost no longer grows with T)."""
        scores = np.asarray(scores, dtype=np.float32)
        if scores.ndim != 2 or scores.shape[1] != self.labels.T:
            raise ScoringError(f"decode: scores shape {list(scores.shape)}, expected [N, {self.labels.T}]")
        n = scores.shape[0]
        rows, cols = np.nonzero(scores >= self._thr[None, :])  # row-major: each row's labels in index order
        values = scores[rows, cols].tolist()
        ends = np.cumsum(np.bincount(rows, minlength=n)).tolist()
        cols_list = cols.tolist()
        out: list[list[Tag]] = []
        start = 0
        for end in ends:
            out.append(self._decode_passing(cols_list[start:end], values[start:end]) if end > start else [])
            start = end
        return out

    def _decode_passing(self, passing: list[int], scores: list[float]) -> list[Tag]:
        """One row's tags from its passing labels (index order) and their scores (the module docstring's rules)."""
        depth, parent_of, slot, factors = self._depth, self._parent_of, self._slot, self._factors
        score = dict(zip(passing, scores, strict=True))
        # path values, deepest labels first: a label's value is final before it goes into its parent's
        value: dict[int, float] = {}
        best: dict[tuple[int, str], float] = {}
        by_depth = sorted(passing, key=depth.__getitem__, reverse=True)
        for x in by_depth:
            v = score[x]
            for group in factors[x]:
                b = best.get((x, group))
                if b is not None and b >= 0.0:  # (scores below 0, which no model gives, count as none passing)
                    v *= b
            value[x] = v
            key = slot[x]
            if key is not None and v > best.get(key, -1.0):
                best[key] = v
        # emission, groups top-down (a label of a child group only under an emitted parent)
        by_step: dict[int, list[int]] = {}
        step_of = self._step_of
        for x in passing:
            by_step.setdefault(step_of[x], []).append(x)
        emitted: set[int] = set()
        for step in sorted(by_step):
            cands = by_step[step]
            if self._step_has_parent[step]:
                cands = [x for x in cands if parent_of[x] in emitted]
            if not cands:
                continue
            if self._step_exclusive[step]:
                pick = cands[0]
                for x in cands[1:]:
                    if value[x] > value[pick]:  # ties: the lowest index
                        pick = x
                emitted.add(pick)
            else:
                emitted.update(cands)
        # an emitted parent's score is at least its emitted children's (deepest first)
        final = {x: score[x] for x in emitted}
        for x in sorted(emitted, key=depth.__getitem__, reverse=True):
            parent = parent_of[x]
            if parent != _ROOT and final[x] > final[parent]:
                final[parent] = final[x]
        tags, groups = self._tags, self._groups
        out = []
        for x in sorted(emitted):
            v = final[x]
            out.append(Tag(tags[x], groups[x], round(0.0 if v < 0.0 else 1.0 if v > 1.0 else v, 6), "model"))
        return out

    def decode_row(self, row: np.ndarray) -> list[Tag]:
        """Model tags of one score row [T]."""
        return self.decode(np.asarray(row, dtype=np.float32)[None, :])[0]


def attribute_tag(name: str, value: str) -> str:
    """The tag of an attribute value: `<prefix>:<value>`, the prefix being the attribute name or its `TAG_PREFIXES`
    entry (`color`, `COLOR` → `colour`), the value's white space (line breaks, tabs, runs of spaces) collapsed to one
    space as training's labels are (`Red\nBlue` would otherwise be a tag with a line break in it)."""
    return f"{tag_prefix(name)}:{' '.join(value.split())}"


def catalog_tags(attributes: Mapping[str, str] | None) -> list[Tag]:
    """Catalog tags `attribute_tag(name, value)` (group = the attribute name, or its `TAG_PREFIXES` entry: `color`
    → `colour`; score 1.0), sorted by attribute; blank ones skipped."""
    out: list[Tag] = []
    for name, value in sorted((attributes or {}).items()):
        if not isinstance(name, str) or not isinstance(value, str):
            continue
        name, value = name.strip(), " ".join(value.split())
        if name and value:
            out.append(Tag(tag=attribute_tag(name, value), group=tag_prefix(name), score=1.0, origin="catalog"))
    return out


def merge_tags(
    model: Iterable[Tag], catalog: Iterable[Tag], behaviour: Iterable[Tag], *, labels: LabelMap | None = None
) -> list[Tag]:
    """The full tag set: model tags, then catalog tags, then behaviour tags, each tag name once.

    A catalog tag's group replaces the model's tags of that group (group names compared by `group_key`: a model
    trained on `gender` or `baseColour` and a catalog sending `Gender` or `colour` name one group). With `labels`,
    model tags whose parent tag was dropped that way are dropped too (so no child is left without its parent). On a
    repeated tag name, catalog wins over behaviour, which wins over model.
    """
    catalog, behaviour = list(catalog), list(behaviour)
    overridden = {group_key(t.group) for t in catalog}
    kept = [t for t in model if group_key(t.group) not in overridden]
    if labels is not None:
        changed = True
        while changed:
            names = {t.tag for t in kept}
            before = len(kept)
            kept = [
                t
                for t in kept
                if (lab := labels.by_tag.get(t.tag)) is None or lab.parent is None or lab.parent in names
            ]
            changed = len(kept) != before
    taken: set[str] = set()
    chosen: dict[str, list[Tag]] = {"catalog": [], "behaviour": [], "model": []}
    for origin, tags in (("catalog", catalog), ("behaviour", behaviour), ("model", kept)):
        for t in tags:
            if t.tag not in taken:
                taken.add(t.tag)
                chosen[origin].append(t)
    return [*chosen["model"], *chosen["catalog"], *chosen["behaviour"]]


def diff_tags(
    old: Iterable[Tag], new: Iterable[Tag], score_delta: float
) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """(added, removed, changed): tag names new minus old, old minus new, and whether an update is due.

    `changed` is true when a tag was added or removed, or a tag present in both moved its score by more than
    `score_delta` or changed its group or origin.
    """
    if score_delta < 0:
        raise ConfigError(f"score_delta {score_delta} < 0")
    old_by = {t.tag: t for t in old}
    new_by = {t.tag: t for t in new}
    added = tuple(t for t in new_by if t not in old_by)
    removed = tuple(t for t in old_by if t not in new_by)
    changed = bool(added or removed)
    if not changed:
        for name, n in new_by.items():
            o = old_by[name]
            if abs(n.score - o.score) > score_delta or n.group != o.group or n.origin != o.origin:
                changed = True
                break
    return added, removed, changed


def tags_from_json(items: Iterable[Mapping[str, Any]]) -> list[Tag]:
    """Tags from their JSON objects (as stored in Redis or carried by tag-update events)."""
    return [Tag(tag=d["tag"], group=d["group"], score=float(d["score"]), origin=d["origin"]) for d in items]


def tags_to_json(tags: Iterable[Tag]) -> list[dict[str, Any]]:
    """The JSON objects of tags."""
    return [{"tag": t.tag, "group": t.group, "score": t.score, "origin": t.origin} for t in tags]
