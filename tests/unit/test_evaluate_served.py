"""The training report and `tagstream evaluate` count alike, and both report the tags serving emits (`served`).

Hand-made label maps and score matrices: which label each product's scores make serving emit is worked out by hand
from `serving.decoding`'s rules (the best label among those passing their thresholds, parent required, category
paths by product of level scores).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support
from sklearn.preprocessing import MultiLabelBinarizer

from serving.bundle import LabelMap as BundleLabelMap
from serving.bundle import Thresholds
from training.catalog import CatalogProduct
from training.evaluate import SERVED_KEYS, evaluate_bundle_scores
from training.labels import LabelMap
from training.report import write_report


def _labels_json(groups: list[tuple[str, str, str | None]], labels: list[tuple[str, str, str | None]]) -> dict:
    """labels.json of (group, kind, parent group) and (tag, group, parent tag), in column order."""
    return {
        "format_version": 1,
        "groups": [{"name": n, "kind": k, "parent_group": p} for n, k, p in groups],
        "labels": [
            {"index": i, "tag": t, "group": g, "value": t.rsplit("/", 1)[-1].split(":")[-1], "parent": p}
            for i, (t, g, p) in enumerate(labels)
        ],
    }


COLOURS = _labels_json(
    [("colour", "exclusive", None)],
    [("colour:Red", "colour", None), ("colour:Blue", "colour", None), ("colour:Green", "colour", None)],
)


def _colour(i: int, colour: str) -> CatalogProduct:
    return CatalogProduct(f"p{i}", f"product {i}", attributes={"colour": colour})


def test_served_figures_count_the_label_serving_emits_not_the_top1() -> None:
    products = [_colour(1, "Blue"), _colour(2, "Red"), _colour(3, "Green"), _colour(4, "Red")]
    scores = np.array(
        [
            [0.60, 0.35, 0.05],  # Red is top-1 but below its 0.7: serving emits Blue (passes its 0.3), right
            [0.60, 0.35, 0.05],  # the same scores on a Red product: serving emits Blue, wrong
            [0.20, 0.10, 0.45],  # Green is top-1 but below its 0.5: nothing emitted, a miss
            [0.90, 0.05, 0.05],  # Red passes: emitted, right
        ]
    )
    thresholds = {"default": 0.5, "per_tag": {"colour:Red": 0.7, "colour:Blue": 0.3}}
    rep = evaluate_bundle_scores(scores, COLOURS, products, thresholds)
    served = rep["served"]["groups"]["colour"]
    assert served["n"] == 4 and served["n_unknown"] == 0
    assert served["accuracy"] == pytest.approx(2 / 4)
    assert served["coverage"] == pytest.approx(3 / 4)  # p3 got no colour
    assert served["micro_precision"] == pytest.approx(2 / 3) and served["micro_recall"] == pytest.approx(2 / 4)
    assert served["per_tag"]["colour:Blue"] == {
        "precision": 0.5,
        "recall": 1.0,
        "f1": pytest.approx(2 / 3),
        "support": 1,
        "predicted": 2,
    }
    assert served["per_tag"]["colour:Red"]["recall"] == 0.5 and served["per_tag"]["colour:Green"]["predicted"] == 0
    truth = ["Blue", "Red", "Green", "Red"]
    emitted = ["Blue", "Blue", "none", "Red"]  # sklearn's view of it ("none" is no label: a miss, not a prediction)
    for avg in ("micro", "macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            truth, emitted, labels=["Blue", "Green", "Red"], average=avg, zero_division=0
        )
        assert (served[f"{avg}_precision"], served[f"{avg}_recall"], served[f"{avg}_f1"]) == pytest.approx((p, r, f))
    # the top-1 figures stay what they were: the model's best label, then its threshold (p1 Red, p2 Red, p3 Green)
    assert rep["groups"]["colour"]["accuracy"] == pytest.approx(1 / 4)  # only p4's Red passes its threshold


def test_served_category_levels_are_the_path_serving_emits() -> None:
    labels = _labels_json(
        [("category_l1", "exclusive", None), ("category_l2", "exclusive", "category_l1")],
        [
            ("category:A", "category_l1", None),
            ("category:B", "category_l1", None),
            ("category:A/a", "category_l2", "category:A"),
            ("category:B/b", "category_l2", "category:B"),
        ],
    )
    products = [CatalogProduct(f"p{i}", f"t{i}", category_path=("B", "b")) for i in range(2)]
    scores = np.array(
        [
            # A 0.55 with no passing child beats B's path 0.45 × 0.7: serving emits A and no second level
            [0.55, 0.45, 0.30, 0.70],
            # A is below its threshold: serving emits B and B/b
            [0.38, 0.45, 0.30, 0.95],
        ]
    )
    rep = evaluate_bundle_scores(scores, labels, products, {"default": 0.4})
    l1, l2 = rep["served"]["groups"]["category_l1"], rep["served"]["groups"]["category_l2"]
    assert l1["accuracy"] == 0.5 and l1["coverage"] == 1.0
    assert l2["accuracy"] == 0.5 and l2["coverage"] == 0.5  # p0's B/b is top-1 and passes, but is never served
    assert rep["groups"]["category_l2"]["accuracy"] == 1.0  # top-1 at the thresholds credits it


FREE_TAGS = _labels_json(
    [("category_l1", "exclusive", None), ("tags", "multi", None)],
    [
        ("category:A", "category_l1", None),
        ("category:B", "category_l1", None),
        ("sale", "tags", None),
        ("summer", "tags", None),
        ("kids", "tags", None),
    ],
)


def test_the_free_tags_group_is_evaluated_on_what_serving_emits() -> None:
    tags = [("sale", "summer"), ("summer",), (), ("kids", "rare")]  # "rare": a free tag the model does not know
    products = [CatalogProduct(f"p{i}", f"t{i}", category_path=("A",), tags=t) for i, t in enumerate(tags)]
    scores = np.array(
        [
            [0.9, 0.1, 0.70, 0.40, 0.10],  # emits sale, summer: the exact set
            [0.9, 0.1, 0.60, 0.20, 0.00],  # emits sale (not carried), misses summer
            [0.9, 0.1, 0.10, 0.10, 0.10],  # emits nothing, carries nothing: exact
            [0.9, 0.1, 0.10, 0.10, 0.90],  # emits kids, misses rare
        ]
    )
    thresholds = {"default": 0.5, "per_tag": {"summer": 0.3, "kids": 0.6}}
    rep = evaluate_bundle_scores(scores, FREE_TAGS, products, thresholds)
    assert set(rep["groups"]) == {"category_l1"}  # top-1 figures: exclusive groups only, as before
    free = rep["served"]["groups"]["tags"]
    assert free["n"] == 4 and free["n_unknown"] == 1
    assert free["accuracy"] == 0.5  # exact set match: p0 and p2
    assert free["coverage"] == 0.75
    assert free["micro_precision"] == 0.75 and free["micro_recall"] == 0.6
    assert free["per_tag"]["sale"] == {
        "precision": 0.5,
        "recall": 1.0,
        "f1": pytest.approx(2 / 3),
        "support": 1,
        "predicted": 2,
    }
    assert free["per_tag"]["rare"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "predicted": 0}
    emitted = [{"sale", "summer"}, {"sale"}, set(), {"kids"}]
    mlb = MultiLabelBinarizer().fit([set(t) for t in tags] + emitted)
    y, p = mlb.transform([set(t) for t in tags]), mlb.transform(emitted)
    for avg in ("micro", "macro", "weighted"):
        prec, rec, f1, _ = precision_recall_fscore_support(y, p, average=avg, zero_division=0)
        assert (free[f"{avg}_precision"], free[f"{avg}_recall"], free[f"{avg}_f1"]) == pytest.approx((prec, rec, f1))


def test_training_report_and_tagstream_evaluate_count_unknown_labels_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    from training import train as train_module

    products = [_colour(1, "Red"), _colour(2, "Blue"), _colour(3, "Purple"), _colour(4, "Purple")]  # Purple: unknown
    scores = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    baseline = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1], [0.8, 0.1, 0.1]])
    thresholds = Thresholds(default=0.5, per_tag={"colour:Red": 0.7, "colour:Blue": 0.25})
    # what `train` writes into metrics.json (a model and its baseline on the test products)
    metrics = train_module.held_out_metrics(
        scores, products, LabelMap.from_json(COLOURS), thresholds, baseline=baseline
    )
    # what `tagstream evaluate` reports on the same scores
    bundle = SimpleNamespace(labels=BundleLabelMap.from_json(COLOURS), thresholds=thresholds)
    monkeypatch.setattr(train_module, "bundle_scores", lambda bundle_dir, ps: (bundle, scores))
    evaluated = train_module.evaluate_bundle("bundle", products)

    top1, base = metrics["top1"]["groups"]["colour"], metrics["baseline"]["groups"]["colour"]
    assert (top1["n"], top1["n_unknown"], base["n"], base["n_unknown"]) == (4, 2, 4, 2)
    assert top1["accuracy"] == 0.25 and base["accuracy"] == 0.5  # the Purple products are misses of both
    for key in ("n", "n_unknown", "accuracy", "micro_f1", "macro_f1", "weighted_f1"):
        assert evaluated["groups"]["colour"][key] == top1[key], key
    served = metrics["served"]["groups"]["colour"]
    assert served["n_unknown"] == 2 and served["accuracy"] == 0.5  # p2's Red fails its 0.7 and Blue passes its 0.25
    assert evaluated["served"]["groups"]["colour"] == {k: served[k] for k in SERVED_KEYS}
    at_thresholds = train_module.evaluate_bundle("bundle", products, at_thresholds=True)["groups"]["colour"]
    assert at_thresholds["accuracy"] == metrics["at_thresholds"]["groups"]["colour"]["accuracy"] == 0.25


def test_the_report_shows_served_beside_top1_and_the_free_tags(tmp_path: Path) -> None:
    products = [
        CatalogProduct(f"p{i}", f"t{i}", category_path=("AB"[i % 2],), tags=("sale",) * (i % 2)) for i in range(8)
    ]
    rng = np.random.default_rng(0)
    scores = rng.random((8, 5))
    rep = evaluate_bundle_scores(scores, FREE_TAGS, products, {"default": 0.5})
    files = write_report(tmp_path / "rep", model=rep, served=rep["served"])
    page = files.html.read_text(encoding="utf-8")
    assert "<th>model (top-1)</th><th>baseline (top-1)</th><th>model, served</th>" in page
    assert "tags (multi-label, served)" in page and "exact match" in page and "<td>sale</td>" in page
    assert "shipped thresholds" in page
    assert not [p for p in files.images if "tags" in p.name]  # plots stay per exclusive group
    doc = json.loads(files.json.read_text(encoding="utf-8"))
    assert doc["served"]["groups"]["tags"]["per_tag"]["sale"]["support"] == 4
