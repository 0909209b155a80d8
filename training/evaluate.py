"""Evaluation of exclusive tag groups: accuracy, micro/macro/weighted P/R/F1, per-tag figures, coverage at the
shipped thresholds, most-confused pairs, calibration (reliability bins) and PR curves of the largest tags.

Conventions (numpy only; checked against sklearn.metrics in the tests):

- A row whose true label is -1 (e.g. the product has no `colour`) is left out of that group's figures. A product
  whose true label the model does not know is a miss (`with_unknown_as_misses`), not left out.
- A prediction of -1 means "no tag" (the top score is below its threshold): it is a miss for the true tag
  (lowers recall) and a prediction of nothing (does not lower any tag's precision). So micro recall = accuracy,
  and micro precision = accuracy / coverage.
- Macro and weighted averages run over the tags that occur in y_true or y_pred (sklearn's `labels=None`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.catalog import CatalogProduct

__all__ = [
    "GroupPredictions",
    "calibration_bins",
    "evaluate_bundle_scores",
    "evaluate_group",
    "evaluate_groups",
    "f1_intervals",
    "pr_curve",
    "true_tags",
    "unevaluated_groups",
    "with_unknown_as_misses",
]


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


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def _f1(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    return _safe_div(2 * p * r, p + r)


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
    micro_p = float(tp.sum() / predicted.sum()) if predicted.sum() else 0.0
    micro_r = float(tp.sum() / support.sum())
    w = support[present] / support.sum()
    out.update(
        {
            "accuracy": _r(hit.mean()),
            "coverage": _r((yp >= 0).mean()),
            "micro_precision": _r(micro_p),
            "micro_recall": _r(micro_r),
            "micro_f1": _r(_f1(np.array([micro_p]), np.array([micro_r]))[0]),
            "macro_precision": _r(prec[present].mean()),
            "macro_recall": _r(rec[present].mean()),
            "macro_f1": _r(f1[present].mean()),
            "weighted_precision": _r((prec[present] * w).sum()),
            "weighted_recall": _r((rec[present] * w).sum()),
            "weighted_f1": _r((f1[present] * w).sum()),
            "n_tags_present": int(present.sum()),
        }
    )
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


def true_tags(p: CatalogProduct) -> set[str]:
    """The SPEC §1 tag names a catalog product carries (as `training.labels` spells them) plus its free tags."""
    from training.labels import product_labels

    return {tag for _, tag in product_labels(p, exclude_attributes=())}


def evaluate_bundle_scores(
    scores: np.ndarray,
    labels_json: Mapping[str, Any],
    products: Sequence[CatalogProduct],
    thresholds_json: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate a bundle's `scores` [N, T] (columns as in `labels.json`) against the products' catalog labels.

    Every exclusive group of `labels.json` becomes a `GroupPredictions`: the true tag is the group's label whose
    `tag` the product carries (`true_tags`), the prediction the top column if it reaches its threshold
    (`thresholds.json` per_tag, else default, else 0.5). Multi-label groups are skipped.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(products), len(labels_json["labels"])):
        raise ValueError(f"scores {scores.shape} != ({len(products)}, {len(labels_json['labels'])})")
    thr = thresholds_json or {}
    default = float(thr.get("default", 0.5))
    per_tag = thr.get("per_tag", {})
    product_tags = [true_tags(p) for p in products]
    groups: dict[str, GroupPredictions] = {}
    for grp in labels_json["groups"]:
        if grp.get("kind", "exclusive") != "exclusive":
            continue
        cols = sorted(
            (lab for lab in labels_json["labels"] if lab["group"] == grp["name"]), key=lambda lab: lab["index"]
        )
        if not cols:
            continue
        names = [lab["tag"] for lab in cols]
        pos = {t: j for j, t in enumerate(names)}
        y_true = np.array([next((pos[t] for t in tags if t in pos), -1) for tags in product_tags], dtype=np.int64)
        idx = [lab["index"] for lab in cols]
        t = np.array([float(per_tag.get(name, default)) for name in names])
        groups[grp["name"]] = GroupPredictions.from_scores(y_true, scores[:, idx], names, t)
    return evaluate_groups(groups, **kwargs)


def unevaluated_groups(report: Mapping[str, Any]) -> list[str]:
    """The groups of an `evaluate_groups` report that no product could be evaluated in: none of the products
    carries a label of the group that the model knows (`n` = 0), so every figure of the group is None."""
    return [name for name, g in report["groups"].items() if not g.get("n")]


def summary_row(report: Mapping[str, Any], group: str) -> dict[str, float | None]:
    """The headline figures of one group (for tables): accuracy, coverage, micro/macro/weighted F1."""
    g = report["groups"].get(group, {})
    keys = ("accuracy", "coverage", "micro_f1", "macro_f1", "weighted_f1")
    return {k: (None if g.get(k) is None or (isinstance(g.get(k), float) and math.isnan(g[k])) else g[k]) for k in keys}
