"""End to end: train on synthetic products → export → bundle → load in serving → score; parity gate; retrain logic.

The training test is `slow` (TensorFlow); the comparison/retrain-loop tests use fakes and run fast.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest

from tagstream.errors import ConfigError, ParityError
from training.catalog import CatalogProduct
from training.publish import compare_reports, eval_holdout, parse_duration, periodic_retrain

LEAVES = {
    ("手机通讯", "手机", "智能手机"): ["手机", "5G", "全网通", "smartphone", "双卡"],
    ("手机通讯", "手机配件", "数据线"): ["数据线", "USB", "Type-C", "快充线", "cable"],
    ("服饰", "上衣", "衬衫"): ["衬衫", "shirt", "长袖", "纯棉", "slim"],
    ("服饰", "裤子", "牛仔裤"): ["牛仔裤", "jeans", "直筒", "denim", "修身"],
    ("食品", "饮料", "茶"): ["绿茶", "tea", "茶叶", "铁观音", "green"],
    ("食品", "零食", "饼干"): ["饼干", "biscuit", "cookies", "曲奇", "酥"],
}
COLOURS = {"Black": ["黑色", "black"], "White": ["白色", "white"], "Blue": ["蓝色", "blue"]}
FILLER = ["新款", "包邮", "官方", "正品", "2024", "特价", "pro", "max", "热卖", "经典"]


def synthetic_products(n: int = 300, seed: int = 0) -> list[CatalogProduct]:
    """Titles = 2 leaf words + a colour word + fillers + noise, with labels (category path, colour)."""
    rng = random.Random(seed)
    out = []
    leaves = list(LEAVES)
    for i in range(n):
        path = leaves[i % len(leaves)]
        colour = rng.choice(list(COLOURS))
        words = [*rng.sample(LEAVES[path], 2), rng.choice(COLOURS[colour]), *rng.sample(FILLER, 2)]
        words.append(f"{rng.randint(1, 999)}")
        rng.shuffle(words)
        out.append(
            CatalogProduct(
                product_id=f"syn-{i}",
                title=" ".join(words),
                price=round(rng.uniform(5, 500), 2),
                category_path=path,
                attributes={"colour": colour},
                source=f"shop-{i % 7}",
            )
        )
    return out


@pytest.mark.slow
def test_train_export_bundle_score_and_parity_gate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx
    from onnx import numpy_helper

    from serving.bundle import load_bundle
    from training.evaluate import SERVED_KEYS
    from training.export import check_parity, threshold_vector
    from training.settings import TrainerSettings
    from training.splits import Split, stratified_split
    from training.train import evaluate_bundle, train

    products = synthetic_products(300)
    # two test products of a colour below the minimum support: a label the model does not know (it cannot output it)
    split = stratified_split(products, validation=0.1, test=0.1, seed=42)
    products += [
        dataclasses.replace(p, product_id=f"purple-{i}", attributes={"colour": "Purple"})
        for i, p in enumerate(split.test[:2])
    ]
    split = Split(split.train_idx, split.validation_idx, np.r_[split.test_idx, 300, 301], products)
    settings = TrainerSettings(
        hash_bits=12,
        max_features=48,
        embed_dim=32,
        hidden=(32,),
        epochs=8,
        batch_size=16,
        learning_rate=1e-2,
        min_support=3,
        patience=3,
        parity_samples=300,
        model_name="e2e",
        baseline=True,
    )
    bundle_dir = train(products, settings, registry=tmp_path / "registry", split=split, progress=False)
    assert bundle_dir.parent == tmp_path / "registry"
    names = {p.name for p in bundle_dir.iterdir()}
    assert {
        "model.onnx",
        "labels.json",
        "thresholds.json",
        "featurizer.json",
        "idf.npy",
        "known.npy",
        "metrics.json",
        "golden.npz",
        "manifest.json",
    } <= names

    bundle = load_bundle(bundle_dir)  # validates checksums, graph, golden rows
    manifest = bundle.manifest
    assert manifest["model_name"] == "e2e" and manifest["onnx_opset"] == 17
    assert manifest["featurizer_version"] == "hashtfidf-2" and len(manifest["training_data_sha256"]) == 64
    # the token axis is dynamic, so the scorer (golden check below) passes only the columns a batch uses
    assert manifest["inputs"]["ids"] == ["int64", ["N", "L"]] and manifest["inputs"]["weights"][1] == ["N", "L"]
    metrics = json.loads((bundle_dir / "metrics.json").read_text())
    assert metrics["parity"]["max_abs_diff"] <= 1e-4 and metrics["parity"]["decision_flips"] == 0
    assert metrics["parity"]["samples"] == 2000  # a small catalog too (before: as many as it had products)
    # the shipped weights were refitted on training + validation: so was the baseline, and n_train counts both
    fitted = len(split.train) + len(split.validation)
    assert manifest["n_train"] == fitted and metrics["baseline"]["n_train"] == fitted
    assert metrics["top1"]["groups"]["category_leaf"]["accuracy"] > 0.8, metrics["top1"]
    # the report counts as `tagstream evaluate` does: the Purple products are misses, of the model and the baseline
    n_test = len(split.test)
    evaluated = evaluate_bundle(bundle_dir, split.test)
    for part in ("top1", "at_thresholds", "baseline", "served"):
        colour = metrics[part]["groups"]["colour"]
        assert (colour["n"], colour["n_unknown"]) == (n_test, 2), part
    for g, figures in evaluated["groups"].items():
        top1 = metrics["top1"]["groups"][g]
        assert (figures["n"], figures["n_unknown"]) == (top1["n"], top1["n_unknown"]), g
        assert figures["accuracy"] == pytest.approx(top1["accuracy"], abs=1.01 / n_test), g  # ONNX vs Keras scores
    # and both report the tags serving emits, per group
    assert set(metrics["served"]["groups"]) == set(evaluated["served"]["groups"]) == set(evaluated["groups"])
    for g, figures in evaluated["served"]["groups"].items():
        assert set(figures) == set(SERVED_KEYS) and set(metrics["served"]["groups"][g]) >= set(SERVED_KEYS), g
        assert 0 < figures["coverage"] <= 1 and figures["accuracy"] <= figures["coverage"], g

    # serve it: featurizer from the bundle, OnnxScorer, decoder
    from serving.decoding import TagDecoder
    from serving.scorer import OnnxScorer

    scorer = OnnxScorer()
    scorer.load(bundle)
    assert scorer.check_golden(bundle) <= 1e-4
    fz = bundle.featurizer
    # the golden rows keep the products they were made of, and the bundle's featurizer makes them again
    from serving.validate import check_golden_features

    assert bundle.golden.inputs is not None and len(bundle.golden.inputs) == len(bundle.golden.ids)
    assert all(row.get("title") for row in bundle.golden.inputs)
    check_golden_features(bundle, fz)
    scores = scorer.predict(fz.transform([{"title": "5G 全网通 手机 双卡 黑色 官方"}]))
    assert scores.shape == (1, bundle.T) and np.all((scores >= 0) & (scores <= 1))
    labels = json.loads((bundle_dir / "labels.json").read_text())
    col = {lab["tag"]: lab["index"] for lab in labels["labels"]}
    assert (
        scores[0, col["category:手机通讯"]]
        == scores[0, [col["category:手机通讯"], col["category:服饰"], col["category:食品"]]].max()
    )
    tags = TagDecoder.from_bundle(bundle).decode(scores)[0]
    assert all(t.origin == "model" for t in tags)

    report = evaluate_bundle(bundle_dir, products[:60])
    assert set(report["groups"]) == {"category_l1", "category_l2", "category_leaf", "colour"}
    assert set(report["served"]["groups"]) == set(report["groups"])

    # `tagstream evaluate --json` prints exactly one JSON object with stable group names
    from tagstream.cli import main

    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in products[:80]))
    capsys.readouterr()
    assert main(["evaluate", "--model", str(bundle_dir), "--catalog", str(catalog), "--format", "jsonl", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 80
    assert set(out["groups"]) == {"category_l1", "category_l2", "category_leaf", "colour"}
    assert set(out["groups"]["category_leaf"]) == {"accuracy", "micro_f1", "macro_f1", "weighted_f1"}

    # parity gate: the real model passes, a tampered one (perturbed initializer) is rejected
    golden = bundle.golden
    th = threshold_vector(
        [lab["tag"] for lab in labels["labels"]], json.loads((bundle_dir / "thresholds.json").read_text())
    )
    from serving.featurizer import FeatureBatch

    feats = FeatureBatch(np.array(golden.ids), np.array(golden.weights), np.array(golden.numeric))
    ok = check_parity(bundle.onnx_bytes, golden.scores, feats, th)
    assert ok.max_abs_diff <= 1e-4
    model = onnx.load_from_string(bundle.onnx_bytes)
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the embedding table
    assert init.data_type == onnx.TensorProto.INT8  # shipped as int8 rows (a quarter of the float32 memory)
    arr = numpy_helper.to_array(init).copy()
    arr[1:] = np.clip(arr[1:].astype(np.int16) + 40, -127, 127).astype(np.int8)  # every row but the padding row
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    with pytest.raises(ParityError):
        check_parity(model.SerializeToString(), golden.scores, feats, th)


def test_compare_reports() -> None:
    cur = {"groups": {"category_leaf": {"weighted_f1": 0.90}, "colour": {"weighted_f1": 0.80}}}
    assert compare_reports(cur, None).publish
    same = compare_reports(cur, cur)
    assert same.publish
    better = {"groups": {"category_leaf": {"weighted_f1": 0.91}, "colour": {"weighted_f1": 0.80}}}
    assert compare_reports(better, cur).publish
    worse_one = {"groups": {"category_leaf": {"weighted_f1": 0.95}, "colour": {"weighted_f1": 0.70}}}
    res = compare_reports(worse_one, cur)
    assert not res.publish and any("colour" in r for r in res.reasons)
    slightly_lower_mean = {"groups": {"category_leaf": {"weighted_f1": 0.898}, "colour": {"weighted_f1": 0.80}}}
    assert not compare_reports(slightly_lower_mean, cur).publish  # within tolerance per group, but mean lower
    assert not compare_reports({"groups": {"other": {"weighted_f1": 1.0}}}, cur).publish


def test_parse_duration_and_holdout() -> None:
    assert parse_duration("6h") == 21600 and parse_duration("30m") == 1800 and parse_duration("90") == 90
    assert parse_duration("1d") == 86400
    for bad in ("", "6x", "-1h", "0s"):
        with pytest.raises(ConfigError):
            parse_duration(bad)
    ps = synthetic_products(500)
    held = eval_holdout(ps)
    assert 20 < sum(held) < 80
    assert eval_holdout(list(reversed(ps))) == list(reversed(held))  # membership depends on the id only


def test_periodic_retrain_publishes_only_when_not_worse(tmp_path: Path) -> None:
    from training.settings import TrainerSettings

    quality = iter([0.80, 0.85, 0.70, 0.86])
    made: list[Path] = []
    scores: dict[str, float] = {}

    def fake_train(products, settings, *, registry, split):
        assert len(split.test_idx) > 0 and set(split.test_idx).isdisjoint(split.train_idx)
        b = tmp_path / f"b{len(made)}"
        made.append(b)
        scores[str(b)] = next(quality)
        return b

    def fake_eval(bundle, eval_set):
        return {"groups": {"category_leaf": {"weighted_f1": scores[str(bundle)]}}}

    published: list[Path] = []
    records = periodic_retrain(
        lambda: synthetic_products(200),
        TrainerSettings(),
        every_s=0.0,
        registry=tmp_path,
        max_cycles=4,
        publish=published.append,
        train_fn=fake_train,
        evaluate_fn=fake_eval,
        sleep=lambda s: None,
    )
    assert [r["publish"] for r in records] == [True, True, False, True]
    assert published == [made[0], made[1], made[3]]
