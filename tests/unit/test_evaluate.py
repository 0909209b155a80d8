"""Evaluation metrics against hand-computed values and sklearn, the report shape, the baseline and report files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_fscore_support

from tagstream.synth import generate_catalog
from training.baseline import baseline_scores, run_baseline
from training.catalog import CatalogProduct
from training.evaluate import (
    GroupPredictions,
    evaluate_bundle_scores,
    evaluate_group,
    evaluate_groups,
    f1_intervals,
    with_unknown_as_misses,
)
from training.report import write_report
from training.splits import stratified_split

GROUP_KEYS = {
    "n",
    "n_labels",
    "accuracy",
    "coverage",
    "micro_precision",
    "micro_recall",
    "micro_f1",
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "weighted_precision",
    "weighted_recall",
    "weighted_f1",
    "per_tag",
    "confused_pairs",
}


def test_hand_computed_example() -> None:
    # labels a, b, c; one row unlabelled (-1), one abstention (-1 prediction)
    g = GroupPredictions(
        labels=["a", "b", "c"],
        y_true=np.array([0, 0, 0, 1, 1, 2, -1]),
        y_pred=np.array([0, 0, 1, 1, -1, 2, 0]),
    )
    r = evaluate_group(g)
    assert r["n"] == 6
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["coverage"] == pytest.approx(5 / 6)
    # a: tp 2, pred 2, sup 3 → P 1, R 2/3; b: tp 1, pred 2, sup 2 → P .5, R .5; c: P 1, R 1
    assert r["per_tag"]["a"] == {
        "precision": 1.0,
        "recall": pytest.approx(2 / 3),
        "f1": 0.8,
        "support": 3,
        "predicted": 2,
    }
    assert r["per_tag"]["b"]["precision"] == 0.5 and r["per_tag"]["b"]["recall"] == 0.5
    assert r["micro_precision"] == pytest.approx(4 / 5)  # abstention is not a wrong prediction
    assert r["micro_recall"] == pytest.approx(4 / 6)
    assert r["macro_f1"] == pytest.approx((0.8 + 0.5 + 1.0) / 3)
    assert r["weighted_f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 1.0) / 6)
    assert r["confused_pairs"] == [{"true": "a", "pred": "b", "count": 1, "rate": pytest.approx(1 / 3)}]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k, n = 7, 400
    y_true = rng.integers(0, k - 1, n)  # label 6 never true: only predicted
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(-1, k, n))
    r = evaluate_group(GroupPredictions([f"t{i}" for i in range(k)], y_true, y_pred))
    labels = sorted((set(y_true) | set(y_pred)) - {-1})
    for avg in ("micro", "macro", "weighted"):
        p, rec, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        assert r[f"{avg}_precision"] == pytest.approx(p, abs=1e-6)
        assert r[f"{avg}_recall"] == pytest.approx(rec, abs=1e-6)
        assert r[f"{avg}_f1"] == pytest.approx(f, abs=1e-6)
    p, rec, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for j, lab in enumerate(labels):
        t = r["per_tag"][f"t{lab}"]
        assert (t["precision"], t["recall"], t["f1"], t["support"]) == pytest.approx((p[j], rec[j], f[j], s[j]))


def test_a_true_label_the_model_does_not_know_is_a_miss_counted_by_tag_name_as_sklearn_would() -> None:
    rng = np.random.default_rng(4)
    known, unseen = ["a", "b", "c"], ["new1", "new2"]
    n = 300
    truth = rng.choice([*known, *unseen, None], n, p=[0.3, 0.2, 0.2, 0.1, 0.1, 0.1])  # None: no label
    pred = np.where(rng.random(n) < 0.7, truth, rng.choice(known, n))
    pred = np.array([p if p in known else rng.choice(known) for p in pred])  # the model outputs known tags only
    pos = {t: i for i, t in enumerate(known)}
    g = GroupPredictions(known, [pos.get(t, -1) for t in truth], [pos[p] for p in pred])
    unknown = [t if t in unseen else None for t in truth]
    r = evaluate_group(with_unknown_as_misses(g, unknown))
    has = np.array([t is not None for t in truth])
    yt, yp = truth[has].astype(str), pred[has].astype(str)
    assert r["n"] == has.sum() and r["accuracy"] == pytest.approx((yt == yp).mean(), abs=1e-6)
    for avg in ("macro", "weighted"):
        _, _, f, _ = precision_recall_fscore_support(yt, yp, average=avg, zero_division=0)
        assert r[f"{avg}_f1"] == pytest.approx(f, abs=1e-6)
    assert r["accuracy"] < evaluate_group(g)["accuracy"]  # before: the unknown ones were left out, a higher figure
    nothing_known = GroupPredictions(known, [-1] * 3, [0, 1, 2])
    assert with_unknown_as_misses(nothing_known, ["new1", None, "new2"]) is nothing_known  # stays unevaluated


def test_f1_intervals_hold_the_figures_and_widen_with_rare_tags() -> None:
    rng = np.random.default_rng(3)
    labels = ["a", "b", "c", "rare"]
    y_true = rng.choice(3, size=2000)
    y_true[:4] = 3  # four products of a rare tag, two of them predicted right
    y_pred = np.where(rng.random(2000) < 0.9, y_true, (y_true + 1) % 3)
    y_pred[:4] = [3, 3, 0, 1]
    g = GroupPredictions(labels=labels, y_true=y_true, y_pred=y_pred)
    figures, ci = evaluate_group(g), f1_intervals(g, resamples=400)
    for metric in ("macro_f1", "weighted_f1"):
        low, high = ci[metric]
        assert low <= figures[metric] <= high, metric
    # the rare tag's F1 swings with which of its four products are drawn; the weighted figure barely moves
    assert ci["macro_f1"][1] - ci["macro_f1"][0] > 3 * (ci["weighted_f1"][1] - ci["weighted_f1"][0])
    assert f1_intervals(g, resamples=400) == ci  # seeded
    perfect = GroupPredictions(labels=labels, y_true=y_true, y_pred=y_true)
    assert f1_intervals(perfect, resamples=50)["macro_f1"] == [1.0, 1.0]
    unlabelled = GroupPredictions(labels=labels, y_true=np.full(5, -1), y_pred=np.zeros(5, dtype=int))
    assert f1_intervals(unlabelled)["macro_f1"] is None


def test_scores_thresholds_calibration_and_pr() -> None:
    rng = np.random.default_rng(0)
    n, k = 500, 4
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.5
    s = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    g = GroupPredictions.from_scores(y, s, ["w", "x", "y", "z"], thresholds=0.5)
    assert np.all((g.y_pred == -1) == (s.max(1) < 0.5))
    r = evaluate_group(g)
    assert r["coverage"] == pytest.approx((s.max(1) >= 0.5).mean())
    cal = r["calibration"]
    assert sum(b["count"] for b in cal["bins"]) == n and 0 <= cal["ece"] <= 1
    assert len(r["pr_curves"]) == 4
    for tag, c in r["pr_curves"].items():
        j = "wxyz".index(tag)
        assert c["average_precision"] == pytest.approx(average_precision_score(y == j, s[:, j]), abs=1e-6)
        assert len(c["precision"]) == len(c["recall"]) <= 50


def test_evaluate_groups_shape_and_json() -> None:
    g1 = GroupPredictions(["a", "b"], [0, 1, 1], [0, 1, 0], np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]))
    g2 = GroupPredictions(["colour:Red", "colour:Blue"], [0, -1, 1], [0, 1, -1])
    rep = evaluate_groups({"category_l1": g1, "colour": g2})
    assert rep["n"] == 3 and set(rep["groups"]) == {"category_l1", "colour"}
    assert set(rep["groups"]["category_l1"]) >= GROUP_KEYS and set(rep["groups"]["colour"]) >= GROUP_KEYS
    assert {"calibration", "pr_curves"} <= set(rep["groups"]["category_l1"])
    json.dumps(rep)
    with pytest.raises(ValueError, match="different numbers"):
        evaluate_groups({"a": g1, "b": GroupPredictions(["a"], [0], [0])})
    with pytest.raises(ValueError, match="outside"):
        GroupPredictions(["a"], [0, 1], [0, 0])


def test_evaluate_bundle_scores() -> None:
    labels_json = {
        "format_version": 1,
        "groups": [
            {"name": "category_l1", "kind": "exclusive", "parent_group": None},
            {"name": "colour", "kind": "exclusive", "parent_group": None},
        ],
        "labels": [
            {"index": 0, "tag": "category:A", "group": "category_l1", "value": "A", "parent": None},
            {"index": 1, "tag": "category:B", "group": "category_l1", "value": "B", "parent": None},
            {"index": 2, "tag": "colour:Red", "group": "colour", "value": "Red", "parent": None},
            {"index": 3, "tag": "colour:Blue", "group": "colour", "value": "Blue", "parent": None},
        ],
    }
    products = [
        CatalogProduct("p1", "x", category_path=("A", "a1"), attributes={"colour": "Red"}),
        CatalogProduct("p2", "y", category_path=("B",), attributes={}),
        CatalogProduct("p3", "z", category_path=("B",), attributes={"colour": "Blue"}),
    ]
    scores = np.array([[0.9, 0.1, 0.7, 0.3], [0.4, 0.6, 0.5, 0.5], [0.8, 0.2, 0.45, 0.55]])
    rep = evaluate_bundle_scores(scores, labels_json, products, {"default": 0.5, "per_tag": {"category:B": 0.7}})
    l1, col = rep["groups"]["category_l1"], rep["groups"]["colour"]
    assert l1["n"] == 3 and l1["accuracy"] == pytest.approx(1 / 3)  # p2 below B's 0.7 threshold, p3 wrong
    assert l1["coverage"] == pytest.approx(2 / 3)
    assert col["n"] == 2 and col["accuracy"] == 1.0


@pytest.fixture(scope="module")
def synth_split() -> tuple[list[CatalogProduct], list[CatalogProduct]]:
    sp = stratified_split(generate_catalog(1500, seed=5), validation=0.0, test=0.25, seed=0)
    return sp.train, sp.test


def test_baseline_beats_chance_with_the_same_report_shape(synth_split, tmp_path: Path) -> None:
    train, test = synth_split
    rep = run_baseline(train, test)
    assert set(rep["groups"]) == {"category_l1", "category_l2", "category_leaf", "colour", "gender"}
    assert rep["n"] == len(test)
    for name, g in rep["groups"].items():
        assert set(g) >= GROUP_KEYS, name
        assert g["coverage"] == 1.0
        assert g["accuracy"] > 2.0 / g["n_labels"], name  # well above chance
    assert rep["groups"]["category_leaf"]["weighted_f1"] > 0.6
    assert rep["groups"]["category_l1"]["accuracy"] > 0.9
    json.dumps(rep)

    files = write_report(tmp_path / "rep", model=rep, baseline=rep, data={"path": "x", "rows_read": 1}, extra={"a": 1})
    assert files.json.exists() and files.html.exists() and files.images
    page = files.html.read_text(encoding="utf-8")
    for img in files.images:
        assert img.exists() and img.suffix == ".png" and f"src='{img.name}'" in page
    kinds = {p.stem.rsplit("_", 1)[-1] for p in files.images}
    assert {"support", "pr", "confused", "calibration"} <= kinds
    doc = json.loads(files.json.read_text(encoding="utf-8"))
    assert set(doc) >= {"model", "baseline", "data"} and "category_leaf" in page
    # the per-tag figures and the most-confused pairs are in the page, not only in report.json (before: plots only)
    colour = rep["groups"]["colour"]
    tag, figures = max(colour["per_tag"].items(), key=lambda kv: kv[1]["support"])
    f1, support = f"{figures['f1']:.3f}", figures["support"]
    assert f"<tr><td>{tag}</td><td>{figures['precision']:.3f}</td><td>{figures['recall']:.3f}</td><td>{f1}</td>" in page
    assert f"<td>{f1}</td><td>{support}</td><td>{f1}</td></tr>" in page  # the baseline's F1 beside it
    if pair := (rep["groups"]["category_leaf"]["confused_pairs"] or [None])[0]:
        assert f"<tr><td>{pair['true']}</td><td>{pair['pred']}</td><td>{pair['count']}</td>" in page


def test_baseline_scores_in_label_map_layout(synth_split) -> None:
    from training import labels

    train, test = synth_split
    lm = labels.build_label_map(train)
    s = baseline_scores(train, test, lm)
    assert s.shape == (len(test), len(lm.labels)) and s.dtype == np.float32
    slices = lm.slices()
    s0, e0 = slices["category_l1"]
    assert np.allclose(s[:, s0:e0].sum(1), 1.0, atol=1e-4)


def test_report_plots_of_groups_with_non_ascii_names_do_not_overwrite_each_other(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)

    def group(labels: list[str]) -> GroupPredictions:
        return GroupPredictions.from_scores(rng.integers(0, len(labels), 60), rng.random((60, len(labels))), labels)

    rep = evaluate_groups(
        {
            "颜色": group(["颜色:红", "颜色:黑"]),
            "材质": group(["材质:棉", "材质:麻", "材质:丝"]),
            "a b": group(["a b:x", "a b:y"]),
            "a_b": group(["a_b:x", "a_b:y"]),
        }
    )
    files = write_report(tmp_path / "rep", model=rep)
    names = [p.name for p in files.images]
    assert len(names) == 16 and len(set(names)) == 16, names  # 4 plots for each of the 4 groups
    assert all(name.isascii() for name in names)
    assert len(list((tmp_path / "rep").glob("*.png"))) == 16


# ---------------------------------------------------------------- `tagstream evaluate` on a catalog of other labels


def _evaluate_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], products: list[CatalogProduct]
) -> tuple[int, str, list[str]]:
    """Run `tagstream evaluate --json` with a tiny bundle (labels: tests.tinymodel.DEFAULT_LABELS) on `products`;
    (exit code, stdout, stderr lines that start with "tagstream ")."""
    from tagstream.cli import main
    from tagstream.synth import write_jsonl
    from tests.models import featurized_bundle

    bundle = featurized_bundle(tmp_path / "registry")
    catalog = tmp_path / "catalog.jsonl"
    write_jsonl(products, catalog)
    capsys.readouterr()
    code = main(["evaluate", "--model", str(bundle), "--catalog", str(catalog), "--format", "jsonl", "--json"])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.startswith("tagstream ")]


def _products(path: tuple[str, ...], colours: tuple[str, ...]) -> list[CatalogProduct]:
    return [
        CatalogProduct(f"e{i}", f"product {i}", category_path=path, attributes={"colour": colours[i % len(colours)]})
        for i in range(12)
    ]


def test_evaluate_with_no_label_the_model_knows_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    # before: n=12, every figure null, exit 0 and no word of why
    code, out, err = _evaluate_cli(tmp_path, capsys, _products(("Shoes", "Boots"), ("Red", "Green")))
    assert code == 2 and out == ""
    assert len(err) == 1 and err[0].startswith("tagstream evaluate: error: "), err
    assert "none of its 12 products has a label the model knows" in err[0]
    assert "category_l1, category_l2, colour" in err[0]


def test_evaluate_warns_on_stderr_of_the_groups_it_could_not_evaluate(tmp_path: Path, capsys) -> None:
    code, out, err = _evaluate_cli(tmp_path, capsys, _products(("Shoes", "Boots"), ("Black", "Navy Blue")))
    assert code == 0
    doc = json.loads(out)  # stdout stays one JSON object with the README's keys (and the served figures)
    assert set(doc) == {"n", "n_unknown", "groups", "served"} and doc["n"] == 12
    assert set(doc["groups"]) == {"category_l1", "category_l2", "colour"}
    assert all(set(g) == {"accuracy", "micro_f1", "macro_f1", "weighted_f1"} for g in doc["groups"].values())
    assert doc["groups"]["colour"]["accuracy"] is not None and doc["groups"]["category_l1"]["accuracy"] is None
    assert doc["n_unknown"] == {"category_l1": 12, "category_l2": 12, "colour": 0}  # none known: not evaluated
    assert len(err) == 1 and err[0].startswith("tagstream evaluate: warning: "), err
    assert "category_l1, category_l2" in err[0] and "colour" not in err[0]


def test_evaluate_says_nothing_more_when_every_group_is_evaluated(tmp_path: Path, capsys) -> None:
    products = _products(("手机通讯", "手机"), ("Black", "Navy Blue"))
    code, out, err = _evaluate_cli(tmp_path, capsys, products)
    assert code == 0 and err == [] and json.loads(out)["groups"]["category_l2"]["accuracy"] is not None


def test_evaluate_counts_a_label_the_model_does_not_know_as_a_miss_and_says_how_many(tmp_path: Path, capsys) -> None:
    # before: the 6 Shoes products were left out of category_l1/l2 (accuracy on the other 6 alone), with no word
    known = _products(("手机通讯", "手机"), ("Black", "Navy Blue"))[:6]
    unseen = [
        dataclasses.replace(p, product_id=f"u{i}", title=f"boots {i}", category_path=("Shoes", "Boots"))
        for i, p in enumerate(known)
    ]
    code, out, err = _evaluate_cli(tmp_path / "known", capsys, known)
    assert code == 0 and err == []
    alone = json.loads(out)["groups"]
    code, out, err = _evaluate_cli(tmp_path / "all", capsys, known + unseen)
    assert code == 0
    doc = json.loads(out)
    assert doc["n_unknown"] == {"category_l1": 6, "category_l2": 6, "colour": 0}  # every colour is known
    for g in ("category_l1", "category_l2"):
        assert doc["groups"][g]["accuracy"] == pytest.approx(alone[g]["accuracy"] * 6 / 12, abs=1e-6)
    assert len(err) == 1 and err[0].startswith("tagstream evaluate: warning: "), err
    assert "counted as misses: category_l1 6 of 12, category_l2 6 of 12" in err[0]


def test_unevaluated_groups() -> None:
    from training.evaluate import unevaluated_groups

    g1 = GroupPredictions(["a", "b"], [0, 1], [0, 0])
    g2 = GroupPredictions(["c", "d"], [-1, -1], [0, 1])
    assert unevaluated_groups(evaluate_groups({"x": g1, "y": g2})) == ["y"]
    assert unevaluated_groups(evaluate_groups({"y": g2})) == ["y"]
    assert unevaluated_groups(evaluate_groups({})) == []


def test_evaluate_json_reports_the_served_tags_of_every_group(tmp_path: Path, capsys) -> None:
    from training.evaluate import SERVED_KEYS

    code, out, _ = _evaluate_cli(tmp_path, capsys, _products(("手机通讯", "手机"), ("Black", "Navy Blue")))
    doc = json.loads(out)
    assert code == 0 and set(doc) == {"n", "n_unknown", "groups", "served"}
    assert set(doc["served"]) == {"category_l1", "category_l2", "colour", "style"}  # the multi-label group too
    assert all(set(g) >= set(SERVED_KEYS) for g in doc["served"].values())
    assert "per_tag" in doc["served"]["style"] and doc["served"]["colour"]["n"] == 12


def _tags_only_bundle(registry: Path) -> Path:
    """A tiny bundle over the real featurizer whose only group is the free `tags` (sale, eco), as training writes
    for a catalog of free tags only."""
    from schemas import ProductChange
    from serving.featurizer import Featurizer, FeaturizerConfig
    from tests.models import TITLES, featurizer_files
    from tests.tinymodel import make_bundle

    labels = {
        "format_version": 1,
        "groups": [{"name": "tags", "kind": "multi", "parent_group": None}],
        "labels": [
            {"index": i, "tag": tag, "group": "tags", "value": tag, "parent": None}
            for i, tag in enumerate(["eco", "sale"])
        ],
    }
    fit_on = [ProductChange("upsert", f"f{i}", 0, 0, title=t, price=1.0 + i) for i, t in enumerate(TITLES * 3)]
    fz = Featurizer.fit(fit_on, FeaturizerConfig(hash_bits=10, max_features=32, min_df=1))
    return make_bundle(
        registry,
        labels=labels,
        thresholds={"format_version": 1, "default": 0.5, "per_tag": {}},
        L=fz.max_features,
        K=fz.n_numeric,
        buckets=fz.n_buckets,
        featurizer_files=featurizer_files(fz),
    )


def test_evaluate_a_model_of_free_tags_only_on_its_own_kind_of_catalog(tmp_path: Path, capsys) -> None:
    from tagstream.cli import main
    from tagstream.synth import write_jsonl

    bundle = _tags_only_bundle(tmp_path / "registry")
    catalog, other = tmp_path / "catalog.jsonl", tmp_path / "other.jsonl"
    write_jsonl([CatalogProduct(f"t{i}", f"shirt {i}", tags=("sale" if i % 2 else "eco",)) for i in range(12)], catalog)
    write_jsonl([CatalogProduct(f"o{i}", f"shirt {i}", tags=("vintage",)) for i in range(12)], other)
    capsys.readouterr()
    code = main(["evaluate", "--model", str(bundle), "--catalog", str(catalog), "--format", "jsonl", "--json"])
    out, err = capsys.readouterr()
    # before: "none of its 12 products has a label the model knows in any of the model's groups (none)", exit 2
    assert code == 0, err
    doc = json.loads(out)
    assert doc["n"] == 12 and doc["groups"] == {} and doc["n_unknown"] == {}
    tags = doc["served"]["tags"]
    assert tags["n"] == 12 and tags["n_unknown"] == 0 and tags["accuracy"] is not None
    assert {t: r["support"] for t, r in tags["per_tag"].items() if r["support"]} == {"eco": 6, "sale": 6}
    # a catalog whose free tags the model does not know is still nothing to evaluate
    assert main(["evaluate", "--model", str(bundle), "--catalog", str(other), "--format", "jsonl", "--json"]) == 2
    assert "none of its 12 products has a label the model knows" in capsys.readouterr().err


def test_evaluate_counts_unknown_free_tags_on_stderr_too(tmp_path: Path, capsys) -> None:
    from tagstream.cli import main
    from tagstream.synth import write_jsonl

    bundle = _tags_only_bundle(tmp_path / "registry")
    catalog = tmp_path / "catalog.jsonl"
    products = [CatalogProduct(f"t{i}", f"shirt {i}", tags=("sale" if i % 2 else "refurbished",)) for i in range(12)]
    write_jsonl(products, catalog)
    capsys.readouterr()
    code = main(["evaluate", "--model", str(bundle), "--catalog", str(catalog), "--format", "jsonl", "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["served"]["tags"]["n_unknown"] == 6
    # before: the JSON had them, stderr said nothing
    assert "counted as misses: tags 6 of 12" in err


def test_evaluate_names_a_catalog_without_labels_as_such(tmp_path: Path, capsys) -> None:
    code, out, err = _evaluate_cli(tmp_path, capsys, [CatalogProduct(f"n{i}", f"shirt {i}") for i in range(5)])
    assert code == 2 and out == "" and len(err) == 1
    # before: "... (a catalog of other labels than the model was trained on?)"
    assert "the catalog has no labels: none of its 5 products has a category path, an attribute or a free tag" in err[0]
