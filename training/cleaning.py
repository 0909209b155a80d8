"""Cleaning of loaded catalogs: text normalisation, missing values, de-duplication and the per-run `DataReport`.

Policy (applied by `clean_products`, in this order):

1. Text: every title/brand/description gets `clean_text` (NFKC, so full-width ASCII becomes half-width, control
   characters removed, white space collapsed). Case is kept in the stored title (it stays readable); the featurizer
   casefolds, and the duplicate key below is the fully normalised text (`normalize_text`: NFKC + casefold + space).
   Label values (category levels, attribute values) get white-space cleanup only, so tags keep the source's spelling.
2. Missing values: a row whose title is empty after cleaning is skipped (reason `empty_title`); an empty brand or
   description becomes None; a missing price stays None; empty attribute values are dropped from `attributes`.
   Attribute names that are one name after cleaning (`colour` and `colour `) are one attribute; if their values
   differ the attribute is dropped from that row (repaired as `attribute_name_conflict`).
3. Duplicates: rows with the same normalised title are one product (identical titles in train and test would
   inflate every metric).
   - same labels (category path + attributes + tags) → the first row is kept, the others are skipped as
     `duplicate` (`duplicates_exact`);
   - conflicting labels → one row is kept with labels voted field by field: the category path by strict majority
     (a tie makes the title ambiguous: all its rows are dropped, `duplicate_conflict_tie`), each attribute by strict
     majority among the rows that have it (a tie drops just that attribute, `attribute_conflicts_dropped`). The
     other rows are skipped as `duplicate_conflict_merged` (`duplicate_conflicts_resolved` counts titles).

The report also warns (`DataReport.warnings`, logged once) about attribute names product-change events cannot carry
(the schema's attribute name pattern refuses them: ``材质``, ``fit type``): training still learns and tags those
groups, but catalog values can never replace the model's tags of them.
"""

from __future__ import annotations

import logging
import re
import statistics
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

from schemas import load_schema
from schemas.registry import quoted
from serving.featurizer import normalize_text as _featurizer_normalize
from training.catalog import JSONL_KEYS, CatalogProduct
from training.labels import (
    CATEGORY_GROUPS,
    DEFAULT_EXCLUDE,
    RESERVED_NAMES,
    TAGS_GROUP,
    attribute_group,
    attribute_key,
    is_excluded,
    product_labels,
)

__all__ = [
    "LEVEL_NAMES",
    "DataReport",
    "clean_label",
    "clean_products",
    "clean_text",
    "label_signature",
    "normalize_text",
    "unsendable_attributes",
]

log = logging.getLogger(__name__)

_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\ufeff]")
_SPACE_RE = re.compile(r"\s+")
# Characters that show nothing and break no word (soft hyphen, word joiner, variation selectors, Hangul fillers, tag
# characters): removed, so a title made only of them is empty.
_INVISIBLE_RE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u2060-\u2064\u206a-\u206f\u3164\ufe00-\ufe0f"
    "\uffa0\U000e0000-\U000e0fff]"
)


def clean_text(s: str | None) -> str:
    """NFKC (full → half width), control and invisible characters removed, white space collapsed and stripped; case
    kept."""
    if not s:
        return ""
    s = unicodedata.normalize("NFKC", s)
    s = _INVISIBLE_RE.sub("", _CONTROL_RE.sub(" ", s))
    return _SPACE_RE.sub(" ", s).strip()


def normalize_text(s: str | None) -> str:
    """The featurizer's normalisation (NFKC, casefold, white space collapse); used as the duplicate key."""
    return _featurizer_normalize(clean_text(s))


def clean_label(s: str | None) -> str:
    """A label value: control characters removed and white space collapsed, otherwise spelled as in the source."""
    if not s:
        return ""
    return _SPACE_RE.sub(" ", _CONTROL_RE.sub(" ", s)).strip()


@cache
def _event_attribute_name() -> re.Pattern[str]:
    """The pattern of attribute names product-change events may carry (the schema's `propertyNames`)."""
    return re.compile(load_schema("product-change")["properties"]["attributes"]["propertyNames"]["pattern"])


def unsendable_attributes(products: Iterable[CatalogProduct]) -> dict[str, int]:
    """Attribute group → products, for the groups training makes (`product_labels`: non-blank, not excluded) whose
    name product-change events cannot carry; names training refuses anyway (reserved) are left out."""
    pattern = _event_attribute_name()
    reserved = {attribute_key(n) for n in RESERVED_NAMES}
    out: Counter[str] = Counter()
    for p in products:
        for name, value in p.attributes.items():
            group = attribute_group(name)
            if not (value and value.strip()) or is_excluded(name) or attribute_key(name) in reserved:
                continue
            if not pattern.search(group):
                out[group] += 1
    return dict(out)


def label_signature(p: CatalogProduct) -> tuple[Any, ...]:
    """What counts as 'the labels' of a product when comparing duplicates."""
    return (p.category_path, tuple(sorted(p.attributes.items())), tuple(sorted(p.tags)))


LEVEL_NAMES = CATEGORY_GROUPS  # the category groups of the label map (paths deeper than 3 levels keep 3)


@dataclass
class DataReport:
    """What happened to one input file: rows read, kept, skipped by reason, repairs, duplicates and label stats."""

    path: str = ""
    fmt: str = ""
    rows_read: int = 0
    rows_parsed: int = 0
    rows_kept: int = 0
    blank_lines: int = 0  # empty or white-space-only lines: neither rows nor malformed
    skipped: Counter[str] = field(default_factory=Counter)
    first_skipped: dict[str, int] = field(default_factory=dict)  # reason -> the first line skipped for it
    repaired: Counter[str] = field(default_factory=Counter)
    first_repaired: dict[str, int] = field(default_factory=dict)  # reason -> the first line repaired for it
    examples: list[dict[str, Any]] = field(default_factory=list)
    duplicates_exact: int = 0
    duplicate_conflicts_resolved: int = 0
    duplicate_conflicts_dropped: int = 0
    duplicate_rows_dropped: int = 0
    attribute_conflicts_dropped: Counter[str] = field(default_factory=Counter)
    # group -> tag -> products: the labels training derives (training.labels.product_labels), before minimum support
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    title_length: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what training keeps but a user should know (`finish`)
    unknown_keys: Counter[str] = field(default_factory=Counter)  # JSONL: keys tagstream does not read -> rows
    # field -> rows whose text cleaning changed it (full/half width, case of labels, white space, control characters)
    normalised: Counter[str] = field(default_factory=Counter)
    # field (or `attribute:<name>`) -> kept products without it (an attribute: of those of its catalog's products
    # that lack it while others have it); filled by `finish`
    missing: dict[str, int] = field(default_factory=dict)
    max_examples: int = 5

    def skip(self, line: int, reason: str, detail: str = "") -> None:
        """Count a skipped row under `reason`, keeping the first few examples (line number + reason)."""
        self.skipped[reason] += 1
        self.first_skipped[reason] = min(line, self.first_skipped.get(reason, line))
        self._example(line, reason, detail, "skipped")

    def repair(self, line: int, reason: str, detail: str = "") -> None:
        """Count a row that was kept after a documented repair (e.g. title and breadcrumb swapped)."""
        self.repaired[reason] += 1
        self.first_repaired[reason] = min(line, self.first_repaired.get(reason, line))
        self._example(line, reason, detail, "repaired")

    def _example(self, line: int, reason: str, detail: str, kind: str) -> None:
        seen = sum(1 for e in self.examples if e["reason"] == reason)
        if seen < self.max_examples:
            self.examples.append({"line": line, "kind": kind, "reason": reason, "detail": detail[:160]})

    @property
    def rows_skipped(self) -> int:
        """Rows skipped for any reason (malformed, empty title, duplicates)."""
        return sum(self.skipped.values())

    def skipped_summary(self) -> str | None:
        """One line for the console when rows were skipped (malformed, merged or dropped as duplicates): `N of M rows
        skipped: <reason> <count> (first at line L); …`, most frequent reason first; None when none was."""
        if not self.skipped:
            return None
        reasons = "; ".join(
            f"{reason} {n:,} (first at line {self.first_skipped[reason]})"
            if reason in self.first_skipped
            else f"{reason} {n:,}"
            for reason, n in self.skipped.most_common()
        )
        return f"{self.rows_skipped:,} of {self.rows_read:,} rows skipped: {reasons}"

    def labels_dropped_summary(self) -> str | None:
        """One line for the console when kept products lost attribute labels: an attribute on which a product's
        duplicate rows tie (`attribute_conflicts_dropped`), or two attribute names of one row that are equal once
        cleaned and have different values (`attribute_name_conflict`); None when none did."""
        parts = []
        if self.attribute_conflicts_dropped:
            named = ", ".join(f"{k} {n:,}" for k, n in self.attribute_conflicts_dropped.most_common())
            parts.append(f"{named} (a product's duplicate rows tie on its value)")
        if n := self.repaired.get("attribute_name_conflict", 0):
            first = self.first_repaired["attribute_name_conflict"]
            parts.append(
                f"{n:,} rows with two attribute names equal once cleaned and different values (first at line {first})"
            )
        return "attribute labels dropped from kept products: " + "; ".join(parts) if parts else None

    def finish(self, products: list[CatalogProduct]) -> None:
        """Fill label counts per group, title length stats and `warnings` from the kept products.

        The counts are of the labels training makes of these products (`training.labels.product_labels`: the
        category tags of at most 3 levels, attribute tags except `year`, free tags), keyed by tag, before the
        minimum support; groups in the label map's order (categories, attributes by name, ``tags``)."""
        self.rows_kept = len(products)
        counts: dict[str, Counter[str]] = {}
        for p in products:
            for group, tag in product_labels(p):
                counts.setdefault(group, Counter())[tag] += 1
        first = [g for g in CATEGORY_GROUPS if g in counts]
        last = [TAGS_GROUP] if TAGS_GROUP in counts else []
        order = first + sorted(set(counts) - set(first) - set(last)) + last
        self.label_counts = {k: dict(counts[k].most_common()) for k in order}
        self.missing = _missing(products)
        self.warnings = []
        if self.unknown_keys:
            keys = ", ".join(f"{quoted(k)} ({n:,})" for k, n in self.unknown_keys.most_common())
            self.warnings.append(
                f"unknown keys ignored: {keys}; the keys a JSONL catalog's products may have are "
                f"{', '.join(JSONL_KEYS)}"
            )
        excluded: Counter[str] = Counter(
            name for p in products for name, value in p.attributes.items() if value.strip() and is_excluded(name)
        )
        if excluded:
            names = ", ".join(f"{name!r} ({n:,} products)" for name, n in sorted(excluded.items()))
            self.warnings.append(
                f"attributes {names} not trained: {', '.join(DEFAULT_EXCLUDE)} (in any case) is listing metadata, "
                "not a property of the product to tag"
            )
        if unsendable := unsendable_attributes(products):
            names = ", ".join(f"{name!r} ({n} products)" for name, n in sorted(unsendable.items()))
            self.warnings.append(
                f"attributes {names}: product-change events cannot carry these names (the schema's attribute name "
                "pattern refuses them: a change that carries one is dead-lettered whole), so the model predicts these "
                "groups but a catalog can never send their values; rename them in the catalog to send them"
            )
        for warning in self.warnings:
            log.warning("%s: %s", self.path or "catalog", warning)
        lengths = sorted(len(p.title) for p in products)
        if lengths:
            self.title_length = {
                "min": float(lengths[0]),
                "median": float(statistics.median(lengths)),
                "mean": round(statistics.fmean(lengths), 2),
                "p95": float(lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]),
                "max": float(lengths[-1]),
            }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (label counts in full, most common first)."""
        return {
            "path": self.path,
            "format": self.fmt,
            "rows_read": self.rows_read,
            "rows_parsed": self.rows_parsed,
            "rows_kept": self.rows_kept,
            "rows_skipped": self.rows_skipped,
            "blank_lines": self.blank_lines,
            "skipped": dict(self.skipped.most_common()),
            "repaired": dict(self.repaired.most_common()),
            "examples": list(self.examples),
            "duplicates": {
                "exact": self.duplicates_exact,
                "conflicts_resolved": self.duplicate_conflicts_resolved,
                "conflicts_dropped": self.duplicate_conflicts_dropped,
                "rows_dropped_in_conflicts": self.duplicate_rows_dropped,
                "attribute_ties_dropped": dict(self.attribute_conflicts_dropped),
            },
            "missing": dict(self.missing),
            "normalised": dict(self.normalised.most_common()),
            "n_labels": {k: len(v) for k, v in self.label_counts.items()},
            "label_counts": self.label_counts,
            "title_length": self.title_length,
            "warnings": list(self.warnings),
        }

    def to_markdown(self) -> str:
        """A short human-readable summary."""
        lines = [
            f"### Data report: `{self.path}` ({self.fmt})",
            "",
            f"- rows read: {self.rows_read}, parsed: {self.rows_parsed}, kept: {self.rows_kept}, "
            f"skipped: {self.rows_skipped}" + (f", blank lines: {self.blank_lines}" if self.blank_lines else ""),
        ]
        if self.skipped:
            lines.append("- skipped by reason: " + ", ".join(f"{k} {v}" for k, v in self.skipped.most_common()))
        if self.repaired:
            lines.append("- repaired: " + ", ".join(f"{k} {v}" for k, v in self.repaired.most_common()))
        lines.append(
            f"- duplicates: exact {self.duplicates_exact}, conflicts resolved by majority "
            f"{self.duplicate_conflicts_resolved}, conflicting titles dropped {self.duplicate_conflicts_dropped} "
            f"({self.duplicate_rows_dropped} rows)"
            + (
                "; attribute ties dropped: "
                + ", ".join(f"{k} {v}" for k, v in self.attribute_conflicts_dropped.most_common())
                if self.attribute_conflicts_dropped
                else ""
            )
        )
        lines += [f"- warning: {w}" for w in self.warnings]
        if self.missing:
            lines.append("- kept products missing a value: " + ", ".join(f"{k} {v}" for k, v in self.missing.items()))
        if self.normalised:
            lines.append("- text normalised: " + ", ".join(f"{k} {v}" for k, v in self.normalised.most_common()))
        if self.title_length:
            tl = self.title_length
            lines.append(
                f"- title length (chars): min {tl['min']:.0f}, median {tl['median']:.0f}, mean {tl['mean']}, "
                f"p95 {tl['p95']:.0f}, max {tl['max']:.0f}"
            )
        if self.label_counts:
            lines += ["", "| group | labels | largest | smallest | labels with < 3 rows |", "|---|---|---|---|---|"]
            for k, c in self.label_counts.items():
                vals = list(c.values())
                top = next(iter(c.items()))
                rare = sum(1 for v in vals if v < 3)
                lines.append(f"| {k} | {len(c)} | {top[0]} ({top[1]}) | {min(vals)} | {rare} |")
        if self.examples:
            lines += ["", "Examples:"]
            lines += [f"- line {e['line']}: {e['kind']} `{e['reason']}` {e['detail']}" for e in self.examples[:15]]
        return "\n".join(lines) + "\n"


def _clean_attributes(attributes: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Names and values cleaned, empty ones dropped. Names that clean to one name (`colour` and `colour `) are one
    attribute: kept when their values agree, dropped when not (second item: the names dropped so)."""
    values: dict[str, set[str]] = {}
    for k, v in attributes.items():
        name, value = clean_label(k), clean_label(v)
        if name and value:
            values.setdefault(name, set()).add(value)
    attrs = {k: next(iter(v)) for k, v in values.items() if len(v) == 1}
    return attrs, [k for k, v in values.items() if len(v) > 1]


def _clean_product(p: CatalogProduct) -> tuple[CatalogProduct, list[str]]:
    """The cleaned product and the attribute names dropped for conflicting values (`_clean_attributes`)."""
    attrs, conflicts = _clean_attributes(p.attributes)
    q = replace(
        p,
        title=clean_text(p.title),
        description=clean_text(p.description) or None,
        brand=clean_text(p.brand) or None,
        category_path=tuple(clean_label(c) for c in p.category_path),
        attributes=attrs,
        tags=tuple(t for t in (clean_label(t) for t in p.tags) if t),
        source=clean_label(p.source) or None,
    )
    return q, conflicts


def _majority(values: list[Any]) -> tuple[Any, bool]:
    """The most common value and whether it wins strictly (no tie)."""
    ranked = Counter(values).most_common(2)
    return ranked[0][0], len(ranked) == 1 or ranked[0][1] > ranked[1][1]


def _missing(products: list[CatalogProduct]) -> dict[str, int]:
    """Kept products without each optional field, and without each attribute some other product has (absent, null or
    empty in the file); only what some product lacks."""
    out: Counter[str] = Counter()
    names: Counter[str] = Counter()
    for p in products:
        out["category_path"] += not p.category_path
        out["description"] += not p.description
        out["brand"] += not p.brand
        out["price"] += p.price is None
        names.update(p.attributes.keys())
    for name, n in sorted(names.items()):
        out[f"attribute:{name}"] = len(products) - n
    return {k: v for k, v in out.items() if v}


def _resolve_conflict(members: list[CatalogProduct], report: DataReport) -> CatalogProduct | None:
    """Per-field majority over rows with one title: category path (tie → None), each attribute (tie → absent)."""
    path, ok = _majority([p.category_path for p in members])
    if not ok:
        return None
    attrs: dict[str, str] = {}
    for name in sorted({k for p in members for k in p.attributes}):
        value, ok = _majority([p.attributes[name] for p in members if name in p.attributes])
        if ok:
            attrs[name] = value
        else:
            report.attribute_conflicts_dropped[name] += 1
    tags, _ = _majority([p.tags for p in members])
    return replace(members[0], category_path=path, attributes=attrs, tags=tags)


def clean_products(
    rows: Iterable[tuple[int, CatalogProduct]], report: DataReport, *, dedupe: bool = True
) -> list[CatalogProduct]:
    """Normalise text, skip empty titles and resolve duplicates (see module docstring); fills `report`."""
    cleaned: list[tuple[int, CatalogProduct]] = []
    for line, p in rows:
        q, conflicts = _clean_product(p)
        if q.title != p.title:
            report.normalised["title"] += 1
        if q.description != p.description:
            report.normalised["description"] += 1
        if q.category_path != p.category_path:
            report.normalised["category_path"] += 1
        if q.attributes != p.attributes:
            report.normalised["attributes"] += 1
        for name in conflicts:
            report.repair(line, "attribute_name_conflict", f"{name!r}: names equal once cleaned, with different values")
        if not q.title:
            report.skip(line, "empty_title")
            continue
        if any(not c for c in q.category_path):
            report.skip(line, "empty_category_level", "/".join(q.category_path))
            continue
        cleaned.append((line, q))
    if not dedupe:
        products = [p for _, p in cleaned]
        report.finish(products)
        return products

    by_key: dict[str, list[tuple[int, CatalogProduct]]] = {}
    for line, p in cleaned:
        by_key.setdefault(normalize_text(p.title), []).append((line, p))
    keep: dict[int, CatalogProduct] = {}
    for members in by_key.values():
        first_line, first = members[0]
        if len(members) == 1:
            keep[first_line] = first
            continue
        if len({label_signature(p) for _, p in members}) == 1:
            keep[first_line] = first
            report.duplicates_exact += len(members) - 1
            for line, _ in members[1:]:
                report.skip(line, "duplicate", "same title and labels as an earlier row")
            continue
        resolved = _resolve_conflict([p for _, p in members], report)
        if resolved is None:
            report.duplicate_conflicts_dropped += 1
            report.duplicate_rows_dropped += len(members)
            for line, _ in members:
                report.skip(line, "duplicate_conflict_tie", "same title, category paths tie: dropped")
            continue
        report.duplicate_conflicts_resolved += 1
        keep[first_line] = resolved
        for line, _ in members[1:]:
            report.skip(line, "duplicate_conflict_merged", "same title, labels resolved by majority")
    products = [keep[line] for line, _ in cleaned if line in keep]
    report.finish(products)
    return products
