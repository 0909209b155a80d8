"""serving.featurizer: determinism, Chinese + English, padding, the L cap, numeric stats, save/load."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from schemas.records import ProductChange
from serving.featurizer import (
    FEATURIZER_VERSION,
    FeatureBatch,
    Featurizer,
    FeaturizerConfig,
    normalize_text,
)
from tagstream.errors import FeaturizerError
from training.catalog import CatalogProduct

TRAIN = [
    CatalogProduct("p1", "ERKE/鸿星尔克 跑步鞋 女式运动鞋 户外 秋冬慢跑鞋 黑色 37", price=199.0),
    CatalogProduct("p2", "华为 Mate 60 Pro 手机 12GB+512GB 雅川青", price=6999.0),
    CatalogProduct("p3", "Turtle Check Men Navy Blue Shirt", brand="Turtle", price=899.0),
    CatalogProduct("p4", "Titan Women Silver Watch", brand="Titan"),
    CatalogProduct("p5", "Garlic Oil - Vegetarian Capsule 500 mg", brand="Sri Sri Ayurveda", price=220.0),
    CatalogProduct("p6", "Peter England Men Party Blue Jeans", description="Slim fit, stretch denim.", price=1299.0),
    CatalogProduct("p7", "小米 Redmi Note 手机 8GB 黑色", price=1499.0),
    CatalogProduct("p8", "Men Navy Blue Casual Shirt", price=999.0),
]
CONFIG = FeaturizerConfig(hash_bits=12, max_features=48, min_df=1)


@pytest.fixture(scope="module")
def fz() -> Featurizer:
    return Featurizer.fit(TRAIN, CONFIG)


def test_normalize_text() -> None:
    assert normalize_text("  ＡＢＣ１２３　Ｍｅｎ\t\nShirt ") == "abc123 men shirt"
    assert normalize_text("ＳＴＲＡßE") == "strasse"
    assert normalize_text(None) == ""
    assert normalize_text("手机　通讯") == "手机 通讯"


def test_shapes_dtypes_padding_and_norm(fz: Featurizer) -> None:
    fb = fz.transform([*TRAIN, CatalogProduct("empty", "")])
    n, big_l = len(TRAIN) + 1, CONFIG.max_features
    assert fb.ids.shape == (n, big_l) and fb.ids.dtype == np.int64
    assert fb.weights.shape == (n, big_l) and fb.weights.dtype == np.float32
    assert fb.numeric.shape == (n, fz.n_numeric) and fb.numeric.dtype == np.float32
    assert fb.ids.min() >= 0 and fb.ids.max() < fz.n_buckets
    pad = fb.ids == 0
    assert np.all(fb.weights[pad] == 0)  # padding has weight 0
    assert np.all(fb.weights[~pad] > 0)
    norms = np.linalg.norm(fb.weights[:-1], axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    assert np.all(fb.ids[-1] == 0) and np.all(fb.weights[-1] == 0)  # empty title → all padding
    for row in fb.ids:  # distinct features per row
        nz = row[row > 0]
        assert len(np.unique(nz)) == len(nz)


def test_chinese_and_english_get_features(fz: Featurizer) -> None:
    fb = fz.transform([TRAIN[1], TRAIN[2]])
    assert (fb.ids[0] > 0).sum() > 20  # Chinese character n-grams
    assert (fb.ids[1] > 0).sum() > 20
    # shared words give shared buckets: "手机" in p2 and p7, "navy blue shirt" in p3 and p8
    wide = Featurizer.fit(TRAIN, FeaturizerConfig(hash_bits=16, max_features=256, min_df=1))
    a, b = wide.transform([TRAIN[1], TRAIN[6]]).ids
    assert len(set(a[a > 0]) & set(b[b > 0])) >= 3
    a, b = wide.transform([TRAIN[2], TRAIN[7]]).ids
    assert len(set(a[a > 0]) & set(b[b > 0])) >= 10


def test_full_width_input_maps_to_same_features(fz: Featurizer) -> None:
    half = fz.transform([{"title": "Men Navy Blue Shirt 37"}])
    full = fz.transform([{"title": "ＭＥＮ　Ｎａｖｙ Ｂｌｕｅ  Ｓｈｉｒｔ ３７"}])
    np.testing.assert_array_equal(half.ids, full.ids)
    np.testing.assert_array_equal(half.weights, full.weights)


def test_batch_equals_single_and_order_independent(fz: Featurizer) -> None:
    batch = fz.transform(TRAIN)
    for i, p in enumerate(TRAIN):
        one = fz.transform_one(p)
        np.testing.assert_array_equal(np.sort(one.ids[0]), np.sort(batch.ids[i]))
        np.testing.assert_allclose(np.sort(one.weights[0]), np.sort(batch.weights[i]), rtol=1e-6)
        np.testing.assert_allclose(one.numeric[0], batch.numeric[i], rtol=1e-6)


def test_accepts_catalog_product_product_change_and_mapping(fz: Featurizer) -> None:
    title = "Turtle Check Men Navy Blue Shirt"
    pc = ProductChange(op="upsert", product_id="x", updated_at=0, version=1, title=title, brand="Turtle", price=899.0)
    d = {"title": title, "brand": "Turtle", "price": 899.0}
    a, b, c = fz.transform([TRAIN[2]]), fz.transform([pc]), fz.transform([d])
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.ids, c.ids)
    hints = ("Apparel > Topwear",)
    wide = Featurizer.fit(
        [*TRAIN, {"title": "shirt", "category_hints": hints}], FeaturizerConfig(max_features=256, min_df=1)
    )
    hinted = wide.transform(
        [ProductChange(op="upsert", product_id="x", updated_at=0, version=1, title=title, category_hints=hints)]
    )
    plain = wide.transform([{"title": title}])
    assert set(hinted.ids[0]) > set(plain.ids[0])  # hint features (whole hint + its words) are added


def test_ids_deterministic_across_processes(fz: Featurizer, tmp_path) -> None:
    fz.save(tmp_path)
    code = (
        "import sys, json; from serving.featurizer import Featurizer; "
        f"f = Featurizer.load({str(tmp_path)!r}); "
        "rows = [{'title': '华为 Mate 60 Pro 手机'}, {'title': 'Navy Blue Shirt'}]; "
        "print(json.dumps(f.transform(rows).ids.tolist()))"
    )
    outs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(seed), "PATH": ""},
        ).stdout
        for seed in (1, 2)
    ]
    assert outs[0] == outs[1]
    here = fz.transform([{"title": "华为 Mate 60 Pro 手机"}, {"title": "Navy Blue Shirt"}]).ids.tolist()
    assert json.loads(outs[0]) == here


def test_max_features_cap_keeps_highest_weights() -> None:
    long_title = " ".join(f"word{i} 商品{i}" for i in range(200))
    cfg = FeaturizerConfig(hash_bits=16, max_features=32, min_df=1)
    small = Featurizer.fit([*TRAIN, CatalogProduct("long", long_title)], cfg)
    wide = Featurizer(
        FeaturizerConfig(hash_bits=16, max_features=4096, min_df=1),
        small.idf,
        small.numeric_mean,
        small.numeric_std,
        known=small.known,
    )
    capped, full = small.transform([{"title": long_title}]), wide.transform([{"title": long_title}])
    assert (capped.ids > 0).sum() == 32
    n_full = int((full.ids > 0).sum())
    assert n_full > 32
    # the kept ids are the 32 highest-weighted of the uncapped row
    order = np.argsort(-full.weights[0][:n_full], kind="stable")
    top = full.weights[0][order[31]]
    kept = set(capped.ids[0][capped.ids[0] > 0])
    assert all(full.weights[0][list(full.ids[0]).index(i)] >= top - 1e-7 for i in kept)
    np.testing.assert_allclose(np.linalg.norm(capped.weights[0]), 1.0, rtol=1e-5)


def test_numeric_standardised_with_saved_stats(fz: Featurizer, tmp_path) -> None:
    fb = fz.transform(TRAIN)
    np.testing.assert_allclose(fb.numeric.mean(axis=0), 0.0, atol=1e-5)  # fitted on exactly these
    stds = fb.numeric.std(axis=0)
    assert np.all((np.abs(stds - 1) < 1e-4) | (stds < 1e-6))
    fz.save(tmp_path)
    spec = json.loads((tmp_path / "featurizer.json").read_text())
    assert spec["version"] == FEATURIZER_VERSION and spec["max_features"] == CONFIG.max_features
    assert [f["name"] for f in spec["numeric"]][:2] == ["log_price", "has_price"]
    assert spec["assets"] == {"idf": "idf.npy", "known": "known.npy"}
    # a new product is standardised with the saved (train) stats, not its own
    one = Featurizer.load(tmp_path).transform([{"title": "x", "price": 10.0}]).numeric[0]
    m, s = spec["numeric"][0]["mean"], spec["numeric"][0]["std"]
    np.testing.assert_allclose(one[0], (np.log1p(10.0) - m) / s, rtol=1e-5)


def test_save_load_round_trip(fz: Featurizer, tmp_path) -> None:
    names = fz.save(tmp_path)
    assert sorted(names) == ["featurizer.json", "idf.npy", "known.npy"]
    loaded = Featurizer.load(tmp_path)
    a, b = fz.transform(TRAIN), loaded.transform(TRAIN)
    for x, y in ((a.ids, b.ids), (a.weights, b.weights), (a.numeric, b.numeric)):
        np.testing.assert_array_equal(x, y)
    assert loaded.spec == fz.spec


def test_load_rejects_mismatched_spec(fz: Featurizer, tmp_path) -> None:
    fz.save(tmp_path)
    np.save(tmp_path / "idf.npy", np.ones(10, np.float32))
    with pytest.raises(FeaturizerError):
        Featurizer.load(tmp_path)
    fz.save(tmp_path)
    spec = json.loads((tmp_path / "featurizer.json").read_text())
    spec["version"] = "other-9"
    (tmp_path / "featurizer.json").write_text(json.dumps(spec))
    with pytest.raises(FeaturizerError):
        Featurizer.load(tmp_path)
    with pytest.raises(FeaturizerError):
        Featurizer.load(tmp_path / "missing")


def test_load_refuses_an_idf_header_claiming_more_memory_than_there_is_or_json_nested_too_deep(
    fz: Featurizer, tmp_path
) -> None:
    """A MemoryError (an .npy header declaring 2^34 floats) or RecursionError escaped: a traceback at publish."""
    fz.save(tmp_path)
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (17179869184,), }"
    header += " " * (64 - (10 + len(header) + 1) % 64) + "\n"
    (tmp_path / "idf.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())
    with pytest.raises(FeaturizerError, match="cannot read featurizer"):
        Featurizer.load(tmp_path)
    fz.save(tmp_path)
    (tmp_path / "featurizer.json").write_bytes(b'{"a":' * 100_000 + b"1" + b"}" * 100_000)
    with pytest.raises(FeaturizerError, match="RecursionError"):
        Featurizer.load(tmp_path)


def test_features_unseen_in_training_are_dropped_even_on_a_trained_bucket() -> None:
    # 256 buckets: new n-grams land on buckets that training products filled
    titles = ["red phone case", "red phone zqx", "blue phone case"]
    train = [CatalogProduct(f"p{i}", t) for i, t in enumerate(titles)]
    known = Featurizer.fit(train, FeaturizerConfig(hash_bits=8, max_features=256, min_df=2))
    unfiltered = Featurizer.fit(train, FeaturizerConfig(hash_bits=8, max_features=256, min_df=2, known_only=False))
    for title in ("vwj", "zqx"):  # never seen; seen in one training product only (min_df 2)
        assert (unfiltered.transform([{"title": title}]).ids > 0).sum() > 0  # collisions with trained buckets
        assert (known.transform([{"title": title}]).ids > 0).sum() == 0
    # features of two or more training products are kept, and the unknown ones change nothing beside them
    a, b = known.transform([{"title": "red phone"}]), known.transform([{"title": "red phone vwj"}])
    assert (a.ids > 0).sum() > 5
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.weights, b.weights)


@pytest.mark.parametrize("n", [0, 1, 7, 5000])
def test_known_set_membership_is_exact(n: int) -> None:
    from serving.featurizer import _KnownSet

    rng = np.random.default_rng(n)
    known = np.unique(rng.integers(1, 2**64 - 1, n, dtype=np.uint64, endpoint=True))
    if n == 7:
        known[0] = 0  # hash 0 is the table's empty marker: kept apart
    edge = np.array([0, 1], dtype=np.uint64)
    unknown = rng.integers(0, 2**64 - 1, 2000, np.uint64)
    queries = np.concatenate([rng.choice(known, 2000) if n else known, unknown, edge])
    assert queries.dtype == np.uint64
    expected = np.isin(queries, known)
    assert expected.sum() >= (2000 if n else 0)
    np.testing.assert_array_equal(_KnownSet(known).contains(queries), expected)


def test_known_features_survive_save_and_load_and_version_1_specs_still_load(fz: Featurizer, tmp_path) -> None:
    fz.save(tmp_path / "v2")
    loaded = Featurizer.load(tmp_path / "v2")
    assert loaded.known is not None and np.array_equal(loaded.known, fz.known)
    np.save(tmp_path / "v2" / "known.npy", fz.known[:-1])  # not the hashes featurizer.json counted
    with pytest.raises(FeaturizerError, match="known"):
        Featurizer.load(tmp_path / "v2")
    np.save(tmp_path / "v2" / "known.npy", fz.known[::-1])  # unsorted
    with pytest.raises(FeaturizerError, match="sorted"):
        Featurizer.load(tmp_path / "v2")
    # a bundle from before the filter (featurizer version 1) featurizes as it did: every bucket with IDF > 0 counts
    old = Featurizer(
        FeaturizerConfig(hash_bits=12, max_features=48, min_df=1, known_only=False),
        fz.idf,
        fz.numeric_mean,
        fz.numeric_std,
    )
    old.save(tmp_path / "v1")
    spec = json.loads((tmp_path / "v1" / "featurizer.json").read_text())
    spec["version"] = "hashtfidf-1"
    for key in ("known_only", "n_known"):
        del spec[key]
    (tmp_path / "v1" / "featurizer.json").write_text(json.dumps(spec))
    v1 = Featurizer.load(tmp_path / "v1")
    assert v1.known is None and not v1.config.known_only
    title = [{"title": "华为 Mate 70 新品 手机"}]
    np.testing.assert_array_equal(v1.transform(title).ids, old.transform(title).ids)


def test_letters_only_bigrams_keep_word_pairs_and_drop_pairs_with_numbers() -> None:
    titles = ["navy blue mate 60 shirt"] * 2 + ["blue navy 60 mate"] * 2
    train = [CatalogProduct(f"p{i}", t) for i, t in enumerate(titles)]

    def n_features(title: str, **config: bool) -> int:
        cfg = FeaturizerConfig(hash_bits=20, max_features=512, min_df=1, **config)
        return int((Featurizer.fit(train, cfg).transform([{"title": title}]).ids > 0).sum())

    # the title has three word pairs, one of them with a number; the rest of its features are the same each time
    base = n_features("navy blue mate 60", word_bigrams=False)
    pairs = n_features("navy blue mate 60", word_bigrams=True)
    letters = n_features("navy blue mate 60", word_bigrams=True, bigrams_letters_only=True)
    assert pairs == base + 3  # "navy blue", "blue mate", "mate 60"
    assert letters == base + 2  # "navy blue", "blue mate"
    spec = Featurizer.fit(train, FeaturizerConfig(hash_bits=20, min_df=1, bigrams_letters_only=True)).spec
    assert spec["hashing"]["bigrams_letters_only"] is True


def test_empty_batch_and_bad_config(fz: Featurizer) -> None:
    fb = fz.transform([])
    assert isinstance(fb, FeatureBatch) and len(fb) == 0 and fb.ids.shape == (0, CONFIG.max_features)
    with pytest.raises(FeaturizerError):
        Featurizer.fit([], CONFIG)
    with pytest.raises(FeaturizerError):
        Featurizer.fit(TRAIN, FeaturizerConfig(hash_bits=40))


def test_unseen_buckets_dropped_with_min_df() -> None:
    f = Featurizer.fit(TRAIN, FeaturizerConfig(hash_bits=14, max_features=64, min_df=2))
    assert f.idf[0] == 0
    fb = f.transform([{"title": "zzqx qqzz"}])  # nothing of it seen in training
    assert (fb.ids > 0).sum() == 0


# -- numeric bounds: each raw numeric signal is clipped to the range of the training products -----------------------

MAX_PRICE = max(p.price for p in TRAIN if p.price is not None)  # p2, 6999


def _without_bounds(f: Featurizer) -> Featurizer:
    """The same featurizer as fitted before the bounds were saved (mean/std only)."""
    return Featurizer(f.config, f.idf, f.numeric_mean, f.numeric_std, n_docs=f.n_docs, known=f.known)


@pytest.mark.parametrize("price", [1e308, 1e30, 1e6, MAX_PRICE * 1.01])
def test_price_beyond_training_range_counts_as_the_largest_training_price(fz: Featurizer, price: float) -> None:
    top = TRAIN[1]
    assert top.price == MAX_PRICE
    at_max = fz.transform([{"title": top.title, "price": MAX_PRICE}])
    huge = fz.transform([{"title": top.title, "price": price}])
    np.testing.assert_array_equal(huge.numeric, at_max.numeric)
    np.testing.assert_array_equal(huge.numeric, fz.transform([top]).numeric)
    np.testing.assert_array_equal(huge.numeric, fz.transform_one({"title": top.title, "price": price}).numeric)
    assert np.all(np.isfinite(huge.numeric)) and np.all(np.abs(huge.numeric) < 10)
    np.testing.assert_array_equal(huge.ids, at_max.ids)


def test_numeric_bounds_are_the_raw_training_extremes(fz: Featurizer) -> None:
    assert fz.numeric_min is not None and fz.numeric_max is not None
    assert fz.numeric_min.dtype == np.float64 and fz.numeric_max.dtype == np.float64
    assert fz.numeric_max[0] == np.log1p(MAX_PRICE)
    assert fz.numeric_min[0] == 0.0  # p4 has no price: log_price 0, has_price 0
    assert (fz.numeric_min[1], fz.numeric_max[1]) == (0.0, 1.0)
    # each bound is some training product's standardised value: features of training products span exactly it
    train = fz.transform(TRAIN).numeric
    expect_lo = ((fz.numeric_min - fz.numeric_mean) / fz.numeric_std).astype(np.float32)
    expect_hi = ((fz.numeric_max - fz.numeric_mean) / fz.numeric_std).astype(np.float32)
    np.testing.assert_array_equal(train.min(axis=0), expect_lo)
    np.testing.assert_array_equal(train.max(axis=0), expect_hi)


def test_training_products_features_unchanged_by_the_clip() -> None:
    # many products with awkward prices and titles: not one bit of their numeric features moves
    rng = np.random.default_rng(7)
    words = ["navy", "blue", "shirt", "手机", "黑色", "watch", "500mg", "华为", "men", "women"]
    train = [
        CatalogProduct(
            f"r{i}",
            " ".join(rng.choice(words, int(rng.integers(0, 9)))),
            price=None if i % 13 == 0 else float(rng.uniform(0, 1) * 10.0 ** rng.integers(-3, 9)),
        )
        for i in range(400)
    ]
    fitted = Featurizer.fit(train, CONFIG)
    assert fitted.numeric_min is not None
    plain = _without_bounds(fitted)
    expected = plain.transform(train).numeric
    np.testing.assert_array_equal(fitted.transform(train).numeric, expected)
    np.testing.assert_array_equal(fitted.transform(train[::-1]).numeric, expected[::-1])  # other batches
    for i in (0, 1, 13, 399):
        np.testing.assert_array_equal(fitted.transform_one(train[i]).numeric[0], expected[i])
    # and after a save/load (the bounds as JSON numbers)
    with_json = Featurizer.from_spec(json.loads(json.dumps(fitted.spec)), fitted.idf, fitted.known)
    np.testing.assert_array_equal(with_json.transform(train).numeric, expected)
    # a price beyond the training range is clipped
    top = max(train, key=lambda p: -1.0 if p.price is None else p.price)
    beyond = fitted.transform([{"title": top.title, "price": 1e308}]).numeric
    np.testing.assert_array_equal(beyond, fitted.transform([top]).numeric)
    assert not np.array_equal(plain.transform([{"title": top.title, "price": 1e308}]).numeric, beyond)


def test_spec_round_trips_the_numeric_bounds(fz: Featurizer, tmp_path) -> None:
    fz.save(tmp_path)
    spec = json.loads((tmp_path / "featurizer.json").read_text())
    for f, lo, hi in zip(spec["numeric"], fz.numeric_min, fz.numeric_max, strict=True):
        assert set(f) == {"name", "mean", "std", "min", "max"}
        assert (f["min"], f["max"]) == (float(lo), float(hi))
    loaded = Featurizer.load(tmp_path)
    assert loaded.numeric_min is not None and loaded.numeric_max is not None
    np.testing.assert_array_equal(loaded.numeric_min, fz.numeric_min)
    np.testing.assert_array_equal(loaded.numeric_max, fz.numeric_max)
    assert loaded.spec == fz.spec
    rows = [*TRAIN, {"title": "x", "price": 1e308}, {"title": "y", "price": 1e30}]
    np.testing.assert_array_equal(loaded.transform(rows).numeric, fz.transform(rows).numeric)
    # min/max on some fields only, or not numbers: refused
    broken = json.loads(json.dumps(spec))
    del broken["numeric"][0]["max"]
    with pytest.raises(FeaturizerError, match="min/max"):
        Featurizer.from_spec(broken, fz.idf, fz.known)
    broken = json.loads(json.dumps(spec))
    broken["numeric"][2]["min"] = broken["numeric"][2]["max"] + 1
    with pytest.raises(FeaturizerError, match="min <= max"):
        Featurizer.from_spec(broken, fz.idf, fz.known)
    broken["numeric"][2]["min"] = "low"
    with pytest.raises(FeaturizerError):
        Featurizer.from_spec(broken, fz.idf, fz.known)


def test_old_spec_without_bounds_loads_and_does_not_clip(fz: Featurizer, tmp_path) -> None:
    fz.save(tmp_path)
    spec = json.loads((tmp_path / "featurizer.json").read_text())
    assert all("min" in f and "max" in f for f in spec["numeric"])
    for f in spec["numeric"]:  # as written before the bounds were saved
        del f["min"], f["max"]
    (tmp_path / "featurizer.json").write_text(json.dumps(spec))
    old = Featurizer.load(tmp_path)
    assert old.numeric_min is None and old.numeric_max is None
    assert old.spec == _without_bounds(fz).spec and all(set(f) == {"name", "mean", "std"} for f in old.spec["numeric"])
    rows = [*TRAIN, {"title": TRAIN[1].title, "price": 1e308}, {"title": TRAIN[1].title, "price": 1e6}]
    got = old.transform(rows).numeric
    np.testing.assert_array_equal(got[: len(TRAIN)], fz.transform(TRAIN).numeric)
    m, s = spec["numeric"][0]["mean"], spec["numeric"][0]["std"]
    np.testing.assert_allclose(got[-2, 0], (np.log1p(1e308) - m) / s, rtol=1e-6)  # unclipped, as before
    np.testing.assert_allclose(got[-1, 0], (np.log1p(1e6) - m) / s, rtol=1e-6)
    assert got[-2, 0] > fz.transform([{"title": "x", "price": 1e308}]).numeric[0, 0]  # the new spec clips
