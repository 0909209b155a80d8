"""Evaluation of tag groups: accuracy, micro/macro/weighted P/R/F1, per-tag figures, coverage, most-confused pairs,
calibration (reliability bins) and PR curves of the largest tags; and the figures of the tags serving emits.

Conventions (numpy only; checked against sklearn.metrics in the tests):

- A row whose true label is -1 (e.g. the product has no `colour`) is left out of that group's figures. A product
  whose true label the model does not know is a miss (`with_unknown_as_misses`), not left out.
- A prediction of -1 means "no tag" (nothing emitted, or the top score below its threshold): it is a miss for the
  true tag (lowers recall) and a prediction of nothing (does not lower any tag's precision). So micro recall =
  accuracy, and micro precision = accuracy / coverage.
- Macro and weighted averages run over the tags that occur in y_true or y_pred (sklearn's `labels=None`).
- Served figures (`evaluate_served`): the tags `serving.decoding.TagDecoder` emits from the same score rows at the
  shipped thresholds (the best label among those passing their thresholds, its parent tag emitted, category paths
  by product of level scores), per group. In the multi-label free `tags` group every product is evaluated (a free tag
  it does not carry is a negative), `accuracy` is the exact match of its set of free tags, and a free tag the model
  does not know is a missed tag (`with_unknown_tags_as_misses`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from training.catalog import CatalogProduct

if TYPE_CHECKING:
    from serving.bundle import LabelMap as BundleLabelMap
    from serving.bundle import Thresholds
    from training.labels import LabelMap, LabelMatrix

__all__ = [
    "SERVED_KEYS",
    "GroupPredictions",
    "MultiLabelPredictions",
    "calibration_bins",
    "evaluate_bundle_scores",
    "evaluate_exclusive",
    "evaluate_group",
    "evaluate_groups",
    "evaluate_multilabel",
    "evaluate_served",
    "f1_intervals",
    "pr_curve",
    "served_tags",
    "unevaluated_groups",
    "unknown_labels",
    "with_unknown_as_misses",
    "with_unknown_tags_as_misses",
]

# The figures of a served group kept by `evaluate_served(full=False)` (`tagstream evaluate --json`'s "served"); the
# multi-label group keeps its `per_tag` figures too.
AVERAGED_METRICS = tuple(f"{avg}_{m}" for avg in ("micro", "macro", "weighted") for m in ("precision", "recall", "f1"))
HEADLINE_METRICS = ("accuracy", "coverage", *AVERAGED_METRICS)  # a group's figures the report tables show
SERVED_KEYS = ("n", "n_unknown", *HEADLINE_METRICS)


@dataclass
class GroupPredictions:
    """Predictions of one exclusive tag group over N products.

    - `labels`: the K tag names of the group (column order of `scores`), e.g. `category:手机通讯/手机` or
      `colour:Navy Blue`; they name the tags in the report.
    - `y_true`: int array [N], index into `labels` of the true tag, -1 if the product has none in this group.
    - `y_pred`: int array [N], index of the predicted tag, -1 for no prediction (below threshold).
    - `scores`: optional float array [N, K] of probabilities (the group's columns of the model's `scores`);
      needed for calibration and PR curves.

    Build it from scores with `GroupPredictions.from_scores(y_true, scores, labels, thresholds)`.
    """

    labels: Sequence[str]
    y_true: np.ndarray
    y_pred: np.ndarray
    scores: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.y_true = np.asarray(self.y_true, dtype=np.int64)
        self.y_pred = np.asarray(self.y_pred, dtype=np.int64)
        k = len(self.labels)
        if self.y_true.ndim != 1 or self.y_true.shape != self.y_pred.shape:
            raise ValueError(f"y_true {self.y_true.shape} and y_pred {self.y_pred.shape} must be equal 1-d shapes")
        for name, a in (("y_true", self.y_true), ("y_pred", self.y_pred)):
            if a.size and (a.min() < -1 or a.max() >= k):
                raise ValueError(f"{name} has indices outside [-1, {k})")
        if self.scores is not None:
            self.scores = np.asarray(self.scores, dtype=np.float64)
            if self.scores.shape != (len(self.y_true), k):
                raise ValueError(f"scores shape {self.scores.shape} != ({len(self.y_true)}, {k})")

    @classmethod
    def from_scores(
        cls,
        y_true: np.ndarray | Sequence[int],
        scores: np.ndarray,
        labels: Sequence[str],
        thresholds: float | np.ndarray | Sequence[float] | None = None,
    ) -> GroupPredictions:
        """Argmax per row; -1 where the top score is below its tag's threshold (scalar, per tag, or None)."""
        scores = np.asarray(scores, dtype=np.float64)
        top = scores.argmax(axis=1) if scores.shape[1] else np.full(len(scores), -1)
        y_pred = top.copy()
        if thresholds is not None and scores.shape[1]:
            thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (scores.shape[1],))
            y_pred[scores[np.arange(len(scores)), top] < thr[top]] = -1
        return cls(labels=list(labels), y_true=np.asarray(y_true), y_pred=y_pred, scores=scores)


def with_unknown_as_misses(g: GroupPredictions, unknown: Sequence[str | None]) -> GroupPredictions:
    """`g` with the products whose true tag is one the model does not know (`unknown[i]`, None for none) counted as
    misses: each such tag becomes an extra label that is never predicted (score 0), so accuracy and every F1 are
    over all the products that carry a label of the group, as sklearn would count them by tag name. Unchanged when
    no product has a known true tag (nothing to evaluate: the group stays unevaluated, `unevaluated_groups`)."""
    if len(unknown) != len(g.y_true):
        raise ValueError(f"unknown covers {len(unknown)} products, the group {len(g.y_true)}")
    extra = sorted({t for t in unknown if t is not None} - set(g.labels))
    if not extra or not (g.y_true >= 0).any():
        return g
    pos = {t: len(g.labels) + j for j, t in enumerate(extra)}
    y_true = g.y_true.copy()
    for i, t in enumerate(unknown):
        if t is not None and y_true[i] < 0 and t in pos:
            y_true[i] = pos[t]
    scores = None if g.scores is None else np.hstack([g.scores, np.zeros((len(y_true), len(extra)))])
    return GroupPredictions([*g.labels, *extra], y_true, g.y_pred, scores)


@dataclass
class MultiLabelPredictions:
    """Predictions of one multi-label tag group (the free `tags`) over N products: `labels` the K tag names,
    `y_true` and `y_pred` bool arrays [N, K] (the tags a product carries, the tags emitted for it)."""

    labels: Sequence[str]
    y_true: np.ndarray
    y_pred: np.ndarray

    def __post_init__(self) -> None:
        self.y_true = np.asarray(self.y_true, dtype=bool)
        self.y_pred = np.asarray(self.y_pred, dtype=bool)
        shape = (len(self.y_true), len(self.labels))
        if self.y_true.shape != shape or self.y_pred.shape != shape:
            raise ValueError(f"y_true {self.y_true.shape} and y_pred {self.y_pred.shape} must both be {shape}")


def with_unknown_tags_as_misses(g: MultiLabelPredictions, unknown: Sequence[Sequence[str]]) -> MultiLabelPredictions:
    """`g` with each product's free tags the model does not know (`unknown[i]`) counted as missed tags: each becomes
    an extra label, carried and never emitted."""
    if len(unknown) != len(g.y_true):
        raise ValueError(f"unknown covers {len(unknown)} products, the group {len(g.y_true)}")
    extra = sorted({t for tags in unknown for t in tags} - set(g.labels))
    if not extra:
        return g
    pos = {t: j for j, t in enumerate(extra)}
    carried = np.zeros((len(g.y_true), len(extra)), dtype=bool)
    for i, tags in enumerate(unknown):
        for t in tags:
            if t in pos:
                carried[i, pos[t]] = True
    y_true = np.hstack([g.y_true, carried])
    y_pred = np.hstack([g.y_pred, np.zeros_like(carried)])
    return MultiLabelPredictions([*g.labels, *extra], y_true, y_pred)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def _f1(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    return _safe_div(2 * p * r, p + r)


def _averages(
    support: np.ndarray,
    predicted: np.ndarray,
    tp: np.ndarray,
    prec: np.ndarray,
    rec: np.ndarray,
    f1: np.ndarray,
    present: np.ndarray,
) -> dict[str, Any]:
    """Micro, macro and weighted precision, recall and F1 (`AVERAGED_METRICS`, None when no tag is present) from the
    per-tag counts and figures, over the tags `present` (true or predicted at least once); and `n_tags_present`."""
    out: dict[str, Any] = dict.fromkeys(AVERAGED_METRICS)
    if present.any():
        micro_p = float(tp.sum() / predicted.sum()) if predicted.sum() else 0.0
        micro_r = float(tp.sum() / support.sum()) if support.sum() else 0.0
        w = support[present] / support.sum() if support.sum() else np.zeros(int(present.sum()))
        out.update(
            {
                "micro_precision": _r(micro_p),
                "micro_recall": _r(micro_r),
                "micro_f1": _r(_f1(np.array([micro_p]), np.array([micro_r]))[0]),
                "macro_precision": _r(prec[present].mean()),
                "macro_recall": _r(rec[present].mean()),
                "macro_f1": _r(f1[present].mean()),
                "weighted_precision": _r((prec[present] * w).sum()),
                "weighted_recall": _r((rec[present] * w).sum()),
                "weighted_f1": _r((f1[present] * w).sum()),
            }
        )
    out["n_tags_present"] = int(present.sum())
    return out


def _r(x: float) -> float:
    return round(float(x), 6)


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> dict[str, Any]:
    """Reliability diagram data of top-1 confidence: per bin count, mean confidence, accuracy; plus ECE."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    bins = []
    ece = 0.0
    n = max(len(confidence), 1)
    for b in range(n_bins):
        m = which == b
        c = int(m.sum())
        conf = float(confidence[m].mean()) if c else None
        acc = float(correct[m].mean()) if c else None
        if c:
            ece += c / n * abs(conf - acc)  # type: ignore[operator]
        bins.append(
            {
                "lower": _r(edges[b]),
                "upper": _r(edges[b + 1]),
                "count": c,
                "mean_confidence": None if conf is None else _r(conf),
                "accuracy": None if acc is None else _r(acc),
            }
        )
    return {"bins": bins, "ece": _r(ece)}


def pr_curve(y: np.ndarray, s: np.ndarray, max_points: int = 50) -> dict[str, Any]:
    """One-vs-rest precision-recall curve (descending thresholds, ≤ max_points) and average precision."""
    y = np.asarray(y, dtype=bool)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    # one point per distinct threshold: the last index of each run of equal scores
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], len(s_sorted) - 1] if len(s_sorted) else np.array([], int)
    pos = int(y.sum())
    precision = tp[last] / (tp[last] + fp[last])
    recall = tp[last] / pos if pos else np.zeros(len(last))
    ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision)) if pos else 0.0
    if len(last) > max_points:  # keep points evenly spaced in recall (plus the first and last)
        targets = np.linspace(0.0, recall[-1], max_points - 1)
        keep = np.unique(np.r_[0, np.searchsorted(recall, targets, side="left").clip(0, len(last) - 1)])
        keep = np.unique(np.r_[keep, len(last) - 1])
        precision, recall, last = precision[keep], recall[keep], last[keep]
    return {
        "precision": [_r(x) for x in precision],
        "recall": [_r(x) for x in recall],
        "thresholds": [_r(x) for x in s_sorted[last]],
        "average_precision": _r(ap),
        "positives": pos,
    }


def _per_tag(yt: np.ndarray, yp: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """Per tag: support, predicted, true positives, precision, recall, F1, and which tags are present."""
    support = np.bincount(yt, minlength=k).astype(np.float64)
    predicted = np.bincount(yp[yp >= 0], minlength=k).astype(np.float64)
    tp = np.bincount(yt[yt == yp], minlength=k).astype(np.float64)
    prec, rec = _safe_div(tp, predicted), _safe_div(tp, support)
    return support, predicted, tp, prec, rec, _f1(prec, rec), (support > 0) | (predicted > 0)


def f1_intervals(g: GroupPredictions, *, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Bootstrap intervals (products resampled with replacement) of the group's macro and weighted F1: how far the
    figures move with which products happen to be in the test part (wide for groups with rare tags)."""
    m = g.y_true >= 0
    yt, yp = g.y_true[m], g.y_pred[m]
    k, n = len(g.labels), len(yt)
    if n == 0:
        return {"macro_f1": None, "weighted_f1": None, "level": level, "resamples": 0}
    rng = np.random.default_rng(seed)
    macro, weighted = np.empty(resamples), np.empty(resamples)
    for i in range(resamples):
        pick = rng.integers(0, n, n)
        support, _, _, _, _, f1, present = _per_tag(yt[pick], yp[pick], k)
        macro[i] = f1[present].mean()
        weighted[i] = (f1 * support).sum() / n
    tail = (1.0 - level) / 2 * 100
    return {
        "macro_f1": [_r(v) for v in np.percentile(macro, [tail, 100 - tail])],
        "weighted_f1": [_r(v) for v in np.percentile(weighted, [tail, 100 - tail])],
        "level": level,
        "resamples": resamples,
    }


def evaluate_group(
    g: GroupPredictions, *, top_confused: int = 10, n_pr_tags: int = 6, n_bins: int = 10
) -> dict[str, Any]:
    """All figures of one group (see module docstring for the conventions)."""
    k = len(g.labels)
    m = g.y_true >= 0
    yt, yp = g.y_true[m], g.y_pred[m]
    n = int(m.sum())
    out: dict[str, Any] = {"n": n, "n_labels": k}
    if n == 0:
        out.update({"accuracy": None, "coverage": None, "per_tag": {}, "confused_pairs": []})
        return out
    hit = yt == yp
    support, predicted, tp, prec, rec, f1, present = _per_tag(yt, yp, k)
    out.update({"accuracy": _r(hit.mean()), "coverage": _r((yp >= 0).mean())})
    out.update(_averages(support, predicted, tp, prec, rec, f1, present))
    out["per_tag"] = {
        g.labels[i]: {
            "precision": _r(prec[i]),
            "recall": _r(rec[i]),
            "f1": _r(f1[i]),
            "support": int(support[i]),
            "predicted": int(predicted[i]),
        }
        for i in np.nonzero(present)[0]
    }
    wrong = (~hit) & (yp >= 0)
    pairs = np.bincount(yt[wrong] * k + yp[wrong], minlength=k * k) if wrong.any() else np.zeros(0, int)
    top = np.argsort(-pairs, kind="stable")[:top_confused] if len(pairs) else []
    out["confused_pairs"] = [
        {
            "true": g.labels[int(c) // k],
            "pred": g.labels[int(c) % k],
            "count": int(pairs[c]),
            "rate": _r(pairs[c] / support[int(c) // k]),
        }
        for c in top
        if pairs[c] > 0
    ]
    if g.scores is not None and k:
        s = g.scores[m]
        top1 = s.argmax(axis=1)
        out["calibration"] = calibration_bins(s.max(axis=1), top1 == yt, n_bins)
        largest = [int(i) for i in np.argsort(-support, kind="stable")[:n_pr_tags] if support[i] > 0]
        out["pr_curves"] = {g.labels[i]: pr_curve(yt == i, s[:, i]) for i in largest}
    return out


def evaluate_groups(groups: Mapping[str, GroupPredictions], **kwargs: Any) -> dict[str, Any]:
    """Report `{"n": products, "groups": {name: evaluate_group(...)}}`; every group must cover the same N rows.

    Group names are kept as given: use `category_l1`, `category_l2`, `category_leaf` and the attribute names.
    """
    sizes = {name: len(g.y_true) for name, g in groups.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"groups cover different numbers of products: {sizes}")
    n = next(iter(sizes.values()), 0)
    return {"n": n, "groups": {name: evaluate_group(g, **kwargs) for name, g in groups.items()}}


def evaluate_exclusive(
    scores: np.ndarray,
    labels: LabelMatrix,
    label_map: LabelMap,
    thresholds: Mapping[str, float] | None = None,
    *,
    unknown: Mapping[str, Sequence[Any]] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """`evaluate_groups` report of every exclusive group of `label_map` from `scores` [N, T] (its columns).

    Without thresholds the prediction is the group's top label (top-1); with them (per tag, 0.5 for a tag without
    one), "no tag" where that label is below its threshold. With `unknown` (`unknown_labels` of the same products), a
    product whose label the model does not know is a miss (`with_unknown_as_misses`), and every group reports
    `n_unknown`, how many such products it has.
    """
    groups = {}
    slices = label_map.slices()
    for g in label_map.groups:
        if g.kind != "exclusive":
            continue
        s, e = slices[g.name]
        tags = [lab.tag for lab in label_map.labels[s:e]]
        th = None if thresholds is None else np.asarray([thresholds.get(t, 0.5) for t in tags])
        groups[g.name] = GroupPredictions.from_scores(labels.targets[g.name], scores[:, s:e], tags, th)
        if unknown is not None:
            groups[g.name] = with_unknown_as_misses(groups[g.name], unknown[g.name])
    report = evaluate_groups(groups, **kwargs)
    if unknown is not None:
        for name, r in report["groups"].items():
            r["n_unknown"] = sum(t is not None for t in unknown[name])
    return report


def evaluate_multilabel(g: MultiLabelPredictions) -> dict[str, Any]:
    """All figures of one multi-label group: every product is evaluated, `accuracy` is the exact match of its set of
    tags, `coverage` the share of products with a tag emitted, per-tag and averaged P/R/F1 as for an exclusive group
    (None when no product carries a tag and none is emitted)."""
    k, n = len(g.labels), len(g.y_true)
    out: dict[str, Any] = {"n": n, "n_labels": k}
    if n == 0:
        out.update({"accuracy": None, "coverage": None, "per_tag": {}})
        return out
    support = g.y_true.sum(axis=0).astype(np.float64)
    predicted = g.y_pred.sum(axis=0).astype(np.float64)
    tp = (g.y_true & g.y_pred).sum(axis=0).astype(np.float64)
    prec, rec = _safe_div(tp, predicted), _safe_div(tp, support)
    f1 = _f1(prec, rec)
    present = (support > 0) | (predicted > 0)
    out.update({"accuracy": _r((g.y_true == g.y_pred).all(axis=1).mean()), "coverage": _r(g.y_pred.any(axis=1).mean())})
    out.update(_averages(support, predicted, tp, prec, rec, f1, present))
    out["per_tag"] = {
        g.labels[i]: {
            "precision": _r(prec[i]),
            "recall": _r(rec[i]),
            "f1": _r(f1[i]),
            "support": int(support[i]),
            "predicted": int(predicted[i]),
        }
        for i in np.nonzero(present)[0]
    }
    return out


def unknown_labels(label_map: LabelMap, products: Sequence[CatalogProduct]) -> dict[str, list[Any]]:
    """Per group, what each product carries that the model cannot output: `LabelMap.unknown_tags` for the exclusive
    groups (the tag, or None), and for a multi-label group the tuple of the product's free tags it does not know."""
    from training.labels import TAGS_GROUP

    out: dict[str, list[Any]] = dict(label_map.unknown_tags(products))
    for g in label_map.groups:
        if g.kind != "exclusive":
            known = {lab.tag for lab in label_map.labels if lab.group == g.name}
            out[g.name] = [
                tuple(t for t in dict.fromkeys(p.tags) if t not in known) if g.name == TAGS_GROUP else ()
                for p in products
            ]
    return out


def served_tags(scores: np.ndarray, labels: BundleLabelMap, thresholds: Thresholds, *, chunk: int = 4096) -> np.ndarray:
    """bool [N, T]: the model tags serving emits for each row of `scores` [N, T], as decoded by
    `serving.decoding.TagDecoder` with the bundle's (serving) label map `labels` and `thresholds`."""
    from serving.decoding import TagDecoder

    decoder = TagDecoder(labels, thresholds)
    column = {lab.tag: lab.index for lab in labels.labels}
    emitted = np.zeros((len(scores), labels.T), dtype=bool)
    for start in range(0, len(scores), chunk):
        for row, tags in enumerate(decoder.decode(scores[start : start + chunk]), start=start):
            for t in tags:
                emitted[row, column[t.tag]] = True
    return emitted


def evaluate_served(
    scores: np.ndarray,
    labels: LabelMatrix,
    label_map: LabelMap,
    thresholds: Thresholds,
    *,
    unknown: Mapping[str, Sequence[Any]],
    full: bool = False,
) -> dict[str, Any]:
    """`{"n", "groups": {group: figures}}` of the tags serving emits from `scores` [N, T] at `thresholds`
    (`served_tags`), every group of `label_map`, the multi-label one too (`evaluate_multilabel`).

    `unknown` is `unknown_labels` of the same products: what the model cannot output counts as a miss, and each group
    reports `n_unknown`, how many products carry such a label. In an exclusive group a product with no tag emitted is
    a miss of its true tag (lowers recall, not precision). `full=False` keeps `SERVED_KEYS` (and the multi-label
    group's `per_tag`).
    """
    scores = np.asarray(scores, dtype=np.float32)
    emitted = served_tags(scores, label_map.bundle_labels(), thresholds)
    slices = label_map.slices()
    groups: dict[str, Any] = {}
    for g in label_map.groups:
        s, e = slices[g.name]
        tags = [lab.tag for lab in label_map.labels[s:e]]
        hit = emitted[:, s:e]
        if g.kind == "exclusive":
            y_pred = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
            r = evaluate_group(
                with_unknown_as_misses(GroupPredictions(tags, labels.targets[g.name], y_pred), unknown[g.name])
            )
            n_unknown = sum(t is not None for t in unknown[g.name])
            keep: tuple[str, ...] = SERVED_KEYS
        else:
            served_multi = MultiLabelPredictions(tags, labels.y[:, s:e] > 0, hit)
            r = evaluate_multilabel(with_unknown_tags_as_misses(served_multi, unknown[g.name]))
            n_unknown = sum(bool(t) for t in unknown[g.name])
            keep = (*SERVED_KEYS, "per_tag")
        r = {"kind": g.kind, **r, "n_unknown": n_unknown}
        groups[g.name] = r if full else {k: r.get(k) for k in keep}
    return {"n": len(scores), "groups": groups}


def evaluate_bundle_scores(
    scores: np.ndarray,
    labels_json: Mapping[str, Any],
    products: Sequence[CatalogProduct],
    thresholds_json: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate a bundle's `scores` [N, T] (columns as in `labels.json`) against the products' catalog labels.

    Per exclusive group (`evaluate_exclusive`) the prediction is the top column if it reaches its threshold
    (`thresholds.json` per_tag, else default, else 0.5) and a label the model does not know is a miss (`n_unknown`);
    under `"served"`, the figures of the tags serving emits at those thresholds (`evaluate_served`, every group).
    """
    from serving.bundle import Thresholds
    from training.labels import LabelMap

    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(products), len(labels_json["labels"])):
        raise ValueError(f"scores {scores.shape} != ({len(products)}, {len(labels_json['labels'])})")
    label_map = LabelMap.from_json(dict(labels_json))
    thr = thresholds_json or {}
    per_tag_json = thr.get("per_tag", {})
    shipped = Thresholds(default=float(thr.get("default", 0.5)), per_tag={t: float(v) for t, v in per_tag_json.items()})
    per_tag = {lab.tag: shipped.for_tag(lab.tag) for lab in label_map.labels}
    truth = label_map.encode(products)
    unknown = unknown_labels(label_map, products)
    report = evaluate_exclusive(scores, truth, label_map, per_tag, unknown=unknown, **kwargs)
    report["served"] = evaluate_served(scores, truth, label_map, shipped, unknown=unknown, full=True)
    return report


def unevaluated_groups(report: Mapping[str, Any]) -> list[str]:
    """The groups of an `evaluate_groups` report that no product could be evaluated in: none of the products
    carries a label of the group that the model knows (`n` = 0), so every figure of the group is None."""
    return [name for name, g in report["groups"].items() if not g.get("n")]


def summary_row(report: Mapping[str, Any], group: str) -> dict[str, float | None]:
    """The headline figures of one group (for tables): accuracy, coverage, micro/macro/weighted F1."""
    g = report["groups"].get(group, {})
    keys = ("accuracy", "coverage", "micro_f1", "macro_f1", "weighted_f1")
    return {k: (None if g.get(k) is None or (isinstance(g.get(k), float) and math.isnan(g[k])) else g[k]) for k in keys}
