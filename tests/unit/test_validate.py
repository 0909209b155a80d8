"""Candidate validation (serving.validate): a corpus of bad bundles, each refused for its own reason; good ones pass.

The corpus (`make_corpus`) is also what the integration test sends to a running worker.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper
from onnx.external_data_helper import set_external_data

import serving.validate
from schemas import ProductChange
from serving.bundle import DEFAULT_LIMITS, load_bundle
from serving.featurizer import FeatureBatch, Featurizer, FeaturizerConfig
from serving.validate import (
    LabelledProduct,
    ValidationPolicy,
    ValidationReport,
    load_golden_set,
    micro_f1,
    open_validated,
    parse_verify_key,
    validate_bundle,
)
from streams.model import BundleModel
from tagstream.errors import ConfigError, ModelRejectedError
from tests.models import featurizer_files
from tests.tinymodel import (
    DEFAULT_LABELS,
    make_bundle,
    make_feature_batch,
    make_model,
    rewrite_manifest,
    run_model,
    tamper,
)

T = len(DEFAULT_LABELS["labels"])
TITLES = [
    "华为 Mate 60 Pro 5G手机 黑色",
    "Turtle Check Men Navy Blue Shirt",
    "苹果 iPhone 15 128GB 蓝色",
    "Nike Women Red Running Shoes",
    "小米 充电宝 20000mAh",
    "Levis Men Black Jeans",
    "Adidas Men Sport Shoes 运动鞋",
    "Casual Cotton Shirt Women Navy",
]


@cache
def featurizer() -> Featurizer:
    """The real featurizer (hash_bits=10, L=32), fitted on a few titles."""
    products = [
        ProductChange("upsert", f"fit-{i}", 0, 0, title=t, brand="brand", price=10.0 + i)
        for i, t in enumerate(TITLES * 3)
    ]
    return Featurizer.fit(products, FeaturizerConfig(hash_bits=10, max_features=32, min_df=1))


def real_bundle(registry: Path, **kwargs: Any) -> Path:
    """A tiny bundle over the real featurizer (loadable by a worker); kwargs go to make_bundle."""
    fz = featurizer()
    if "featurizer_spec" not in kwargs:
        kwargs.setdefault("featurizer_files", featurizer_files(fz))
    return make_bundle(
        registry, L=fz.max_features, K=fz.n_numeric, buckets=kwargs.pop("buckets", fz.n_buckets), **kwargs
    )


def golden_products(n: int = 16) -> list[ProductChange]:
    """Products of the labelled golden set."""
    return [ProductChange("upsert", f"gold-{i}", 0, 0, title=t, price=5.0 + i) for i, t in enumerate((TITLES * 4)[:n])]


def golden_set_of(model: BundleModel, n: int = 16) -> list[LabelledProduct]:
    """A labelled golden set whose truth is `model`'s own tags (so `model` scores micro-F1 1.0 on it)."""
    products = golden_products(n)
    return [
        LabelledProduct(p, frozenset(t.tag for t in row))
        for p, row in zip(products, model.score(products), strict=True)
    ]


def write_golden_jsonl(path: Path, labelled: list[LabelledProduct]) -> Path:
    """The golden set as catalog JSONL with explicit gold_tags."""
    lines = [
        json.dumps(
            {"product_id": lp.product.product_id, "title": lp.product.title, "price": lp.product.price,
             "gold_tags": sorted(lp.tags)},
            ensure_ascii=False,
        )
        for lp in labelled
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def public_b64(key: Ed25519PrivateKey) -> str:
    """Base64 of the raw public key (the TAGSTREAM_MODEL_VERIFY_KEY form)."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


# --------------------------------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class BadCase:
    """A bundle that must be refused, the request that announces it and a fragment of the expected reason."""

    name: str
    path: Path
    reason: str
    sha256: str
    model_version: str


def _manifest_id(path: Path) -> tuple[str, str]:
    data = (path / "manifest.json").read_bytes() if (path / "manifest.json").exists() else b""
    try:
        version = json.loads(data).get("model_version") or path.name
    except ValueError:
        version = path.name
    return hashlib.sha256(data).hexdigest(), version


def _bad_model(root: Path, name: str, model: onnx.ModelProto, key: Ed25519PrivateKey) -> Path:
    return real_bundle(
        root / name, model=model, golden_scores=np.full((64, T), 0.5, np.float32), validate=False, signing_key=key
    )


def make_corpus(root: Path, key: Ed25519PrivateKey, *, with_quality: bool = True) -> list[BadCase]:
    """≥ 15 bad bundles, all signed with `key` except the signature cases (so each fails for one reason only)."""
    fz = featurizer()
    L, K, B = fz.max_features, fz.n_numeric, fz.n_buckets
    cases: list[tuple[str, Path, str, dict[str, str]]] = []

    def good(name: str, **kw: Any) -> Path:
        return real_bundle(root / name, signing_key=key, **kw)

    p = good("wrong-checksum")
    tamper(p, "thresholds.json", b'{"format_version": 1, "default": 0.3, "per_tag": {}}', fix_manifest=False)
    cases.append(("wrong-checksum", p, "thresholds.json: sha256 mismatch", {}))

    cases.append(("missing-signature", real_bundle(root / "unsigned"), "bundle is unsigned", {}))
    other = Ed25519PrivateKey.generate()
    cases.append(("wrong-signature", real_bundle(root / "other-key", signing_key=other), "does not verify", {}))

    p = good("truncated")
    data = (p / "model.onnx").read_bytes()
    tamper(p, "model.onnx", data[: len(data) // 2], signing_key=key)
    cases.append(("truncated-onnx", p, "does not parse as an ONNX model", {}))

    model = make_model(L=L + 8, K=K, buckets=B)
    cases.append(
        ("wrong-input-size", _bad_model(root, "wide", model, key), f"width {L + 8} but featurizer says {L}", {})
    )

    p = good("labels")
    labels = copy.deepcopy(DEFAULT_LABELS)
    labels["labels"] = [x for x in labels["labels"] if x["tag"] != "colour:Navy Blue"]
    for i, x in enumerate(labels["labels"]):
        x["index"] = i
    tamper(p, "labels.json", json.dumps(labels).encode(), signing_key=key)
    cases.append(("wrong-label-count", p, f"'scores' has width {T} but labels.json says {T - 1}", {}))

    clean = make_model(L=L, K=K, buckets=B)
    golden_in = make_feature_batch(64, L=L, K=K, buckets=B, seed=100)
    clean_scores = run_model(clean, golden_in)
    poisoned = make_model(L=L, K=K, buckets=B, poison="nan")
    cases.append(("nan-outputs", good("nan", model=poisoned, golden_scores=clean_scores), "NaN or inf", {}))
    poisoned = make_model(L=L, K=K, buckets=B, poison="inf")
    cases.append(("inf-outputs", good("inf", model=poisoned, golden_scores=clean_scores), "NaN or inf", {}))

    model = make_model(L=L, K=K, buckets=B)
    tensor = next(t for t in model.graph.initializer if t.name == "dense_b")
    set_external_data(tensor, location="weights.bin")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    cases.append(("external-data", _bad_model(root, "external", model, key), "references external data", {}))

    model = make_model(L=L, K=K, buckets=B)
    model.graph.value_info.append(helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 2**40]))
    cases.append(("huge-dims", _bad_model(root, "huge", model, key), "beyond the limit", {}))

    model = make_model(L=L, K=K, buckets=B)
    last = next(n for n in model.graph.node if "scores" in n.output)
    last.output[0] = "pre"
    model.graph.node.append(helper.make_node("Boost", ["pre"], ["scores"], domain="com.example"))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    cases.append(("unknown-domain", _bad_model(root, "domain", model, key), "'com.example' is not allowed", {}))

    model = make_model(L=L, K=K, buckets=B, opset=DEFAULT_LIMITS.max_opset + 1)
    cases.append(("opset-too-new", _bad_model(root, "opset", model, key), f"opset {DEFAULT_LIMITS.max_opset + 1}", {}))

    p = good("fields")
    rewrite_manifest(p, mutate=lambda m: m.pop("training_data_sha256"), signing_key=key)
    cases.append(("missing-manifest-field", p, "missing field 'training_data_sha256'", {}))

    p = good("canary", golden_scores=np.clip(clean_scores + 0.05, 0.0, 1.0))
    cases.append(("canary-mismatch", p, "golden: max |score - golden|", {}))

    p = good("sha")
    cases.append(("manifest-sha-vs-event", p, "differs from the expected", {"sha256": "ab" * 32}))
    cases.append(("version-vs-event", good("version"), "model_version: the request names", {"model_version": "v-x"}))

    p = good("extra")
    (p / "notes.txt").write_text("not in the manifest")
    cases.append(("unlisted-file", p, "notes.txt: present but not listed", {}))

    small = make_model(L=L, K=K, buckets=16)  # embedding smaller than the featurizer's hash space
    p = real_bundle(root / "embedding", model=small, buckets=16, featurizer_spec=None, featurizer_files=fz.save,
                    signing_key=key)  # fmt: skip
    cases.append(("embedding-vs-featurizer", p, "canary: scoring featurized products failed", {}))

    cases.append(("missing-bundle", root / "nowhere", "not a bundle directory", {"sha256": "cd" * 32}))
    if with_quality:
        cases.append(("quality-regression", good("quality", seed=1), "quality: micro-F1", {}))

    out = []
    for name, path, reason, override in cases:
        sha, version = _manifest_id(path)
        out.append(BadCase(name, path, reason, override.get("sha256", sha), override.get("model_version", version)))
    return out


# --------------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def active(tmp_path_factory: pytest.TempPathFactory, key: Ed25519PrivateKey) -> BundleModel:
    path = real_bundle(tmp_path_factory.mktemp("active"), signing_key=key)
    return BundleModel.from_validated(validate_bundle(path))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, key: Ed25519PrivateKey) -> list[BadCase]:
    return make_corpus(tmp_path_factory.mktemp("corpus"), key)


def test_the_corpus_is_large_enough(corpus: list[BadCase]) -> None:
    assert len(corpus) >= 15
    assert len({c.name for c in corpus}) == len(corpus)


def test_every_bad_bundle_is_refused_for_its_reason(
    corpus: list[BadCase], key: Ed25519PrivateKey, active: BundleModel
) -> None:
    policy = ValidationPolicy(
        verify_key=parse_verify_key(public_b64(key)),
        golden_set=golden_set_of(active),
        latency_budget_ms={1: 1000.0, 64: 1000.0},
    )
    for case in corpus:
        with pytest.raises(ModelRejectedError) as info:
            validate_bundle(
                case.path,
                expected_sha256=case.sha256,
                expected_version=case.model_version,
                policy=policy,
                active=active,
            )
        text = " | ".join(info.value.reasons)
        assert case.reason in text, f"{case.name}: {text}"


def test_a_good_bundle_passes_with_figures(tmp_path: Path, key: Ed25519PrivateKey, active: BundleModel) -> None:
    path = real_bundle(tmp_path, signing_key=key)
    sha = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    sig = (path / "manifest.sig").read_text()
    policy = ValidationPolicy(verify_key=parse_verify_key(public_b64(key)), golden_set=golden_set_of(active))
    v = validate_bundle(
        path, expected_sha256=sha, expected_version=path.name, signature=sig, policy=policy, active=active
    )
    assert v.model_version == path.name and v.bundle.signed
    assert v.canary_max_diff <= 1e-4
    assert set(v.latency) == {1, 64} and all(s.p50_ms > 0 for s in v.latency.values())
    assert v.quality is not None and v.quality.candidate_f1 == v.quality.active_f1 == 1.0
    assert v.scorer.loaded


def test_a_request_signature_that_does_not_verify_is_refused(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = real_bundle(tmp_path, signing_key=key)
    bad = base64.b64encode(Ed25519PrivateKey.generate().sign(b"something else")).decode()
    policy = ValidationPolicy(verify_key=key.public_key())
    with pytest.raises(ModelRejectedError, match="request signature: does not verify"):
        validate_bundle(path, signature=bad, policy=policy)


def test_no_verify_key_means_signatures_are_not_required(tmp_path: Path) -> None:
    assert validate_bundle(real_bundle(tmp_path)).bundle.signed is False


def test_latency_budget(tmp_path: Path) -> None:
    path = real_bundle(tmp_path)
    with pytest.raises(ModelRejectedError) as info:
        validate_bundle(path, policy=ValidationPolicy(latency_budget_ms={1: 1e-6, 64: 1e-6}, latency_runs=2))
    assert any("latency: batch 1 median" in r for r in info.value.reasons)
    assert any("latency: batch 64 median" in r for r in info.value.reasons)


def test_quality_drop_within_tolerance_passes(tmp_path: Path, active: BundleModel) -> None:
    other = real_bundle(tmp_path, seed=1)
    golden = golden_set_of(active)
    with pytest.raises(ModelRejectedError, match="quality"):
        validate_bundle(other, policy=ValidationPolicy(golden_set=golden), active=active)
    v = validate_bundle(other, policy=ValidationPolicy(golden_set=golden, max_quality_drop=1.0), active=active)
    assert v.quality is not None and v.quality.candidate_f1 < v.quality.active_f1 == 1.0  # type: ignore[operator]
    # Without an active model there is nothing to regress against.
    assert validate_bundle(other, policy=ValidationPolicy(golden_set=golden)).quality.active_f1 is None  # type: ignore[union-attr]


def test_minimal_featurizer_spec_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelRejectedError, match="featurizer: cannot be loaded"):
        validate_bundle(make_bundle(tmp_path))


def _validated_report(path: Path) -> ValidationReport:
    """What the child process reports for the bundle at `path` (validated here, in-process)."""
    v = validate_bundle(path)
    return ValidationReport(model_version=v.model_version, sha256=v.bundle.sha256, latency=v.latency)


@pytest.mark.parametrize("asset", ["idf.npy", "known.npy"])
def test_reopening_refuses_a_featurizer_asset_swapped_after_validation(tmp_path: Path, asset: str) -> None:
    path = real_bundle(tmp_path)
    report = _validated_report(path)
    assert open_validated(path, report).bundle.featurizer.idf.any()  # the untouched bundle re-opens
    array = np.load(path / asset)  # replaced by one as loadable: as many known hashes, as many IDF weights
    swapped = np.append(array[1:], array[-1] + np.uint64(1)) if asset == "known.npy" else np.zeros_like(array)
    tamper(path, asset, _npy(swapped), fix_manifest=False)
    with pytest.raises(ModelRejectedError, match=asset.replace(".", r"\.")):
        open_validated(path, report)


def test_an_asset_swapped_after_its_check_never_reaches_the_featurizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = real_bundle(tmp_path)
    report = _validated_report(path)
    reread = serving.validate._reread

    def reread_then_swap(root: Path, name: str, expected: str | None, limit: int) -> bytes:
        data = reread(root, name, expected, limit)
        if name == "idf.npy":  # checked: now replace it before the featurizer is built
            tamper(path, name, _npy(np.zeros(featurizer().n_buckets, np.float32)), fix_manifest=False)
        return data

    monkeypatch.setattr(serving.validate, "_reread", reread_then_swap)
    # the featurizer is built from the bytes checked, not from the file read once more
    assert (open_validated(path, report).bundle.featurizer.idf == 1.0).all()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_micro_f1() -> None:
    vocab = {"a", "b", "c"}
    assert micro_f1([{"a", "b"}], [frozenset({"a", "b"})], vocab) == 1.0
    assert micro_f1([{"a"}], [frozenset({"a", "b"})], vocab) == pytest.approx(2 / 3)
    assert micro_f1([{"z"}], [frozenset({"z"})], vocab) == 1.0  # outside the vocabulary: not counted
    assert micro_f1([set()], [frozenset()], vocab) == 1.0


def test_golden_set_derives_tags_like_training(tmp_path: Path) -> None:
    path = tmp_path / "gold.jsonl"
    rows = [
        {
            "product_id": "a",
            "title": "Shirt",
            "category_path": ["Clothing", "Shirts"],
            "attributes": {"baseColour": "Navy"},
        },
        {"product_id": "b", "title": "Phone", "gold_tags": ["category:手机通讯"], "price": 10},
    ]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    a, b = load_golden_set(path)
    assert a.tags == {"category:Clothing", "category:Clothing/Shirts", "colour:Navy"}
    assert b.tags == {"category:手机通讯"} and b.product.price == 10.0
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl:1"):
        load_golden_set(tmp_path / "bad.jsonl")


def test_parse_verify_key_forms(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "k.pem").write_bytes(pem)
    for form in (public_b64(key), pem.decode(), str(tmp_path / "k.pem")):
        got = parse_verify_key(form).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert got == raw
    with pytest.raises(ConfigError):
        parse_verify_key("not a key")


def _bundle_with_golden_products(root: Path, seed: int | None = None, products: list[Any] | None = None) -> Path:
    """A bundle whose golden rows are real products featurized by its featurizer, kept as golden `inputs`; with
    `seed`, its featurizer.json then names another hashing seed (assembled from another training run, say)."""
    from serving.bundle import golden_inputs

    products = products or golden_products(16)
    files = featurizer_files(featurizer())
    shipped = load_bundle(real_bundle(root / "first", featurizer_files=files)).featurizer  # as a bundle loads it
    if seed is not None:
        spec = json.loads(files["featurizer.json"])
        spec["hashing"]["seed"] = seed
        files["featurizer.json"] = json.dumps(spec).encode()
    rows = shipped.transform(products)
    inputs = golden_inputs(products, description_chars=2 * shipped.config.max_description_chars)
    return real_bundle(root, featurizer_files=files, golden_features=rows, golden_inputs=inputs)


def test_a_bundle_whose_featurizer_does_not_make_its_golden_rows_is_refused(tmp_path: Path) -> None:
    """Its ONNX model would score features it never learnt: every tag wrong, yet the canary on stored rows passed."""
    good = validate_bundle(_bundle_with_golden_products(tmp_path / "good"))
    assert good.bundle.golden.inputs is not None and len(good.bundle.golden.inputs) == 16
    with pytest.raises(ModelRejectedError) as refused:
        validate_bundle(_bundle_with_golden_products(tmp_path / "other-seed", seed=777))
    [reason] = refused.value.reasons
    assert reason.startswith("featurizer: does not reproduce the features of ") and "16 golden rows" in reason


def test_golden_rows_that_differ_only_by_a_tie_at_the_top_l_cut_pass_and_any_other_change_is_refused(
    tmp_path: Path,
) -> None:
    """Another numpy build may break a near-tie at the top-L cut the other way, or order equal weights otherwise: a
    good bundle was refused for it. Any feature of another weight, or in a row that was never cut, still refuses."""
    from serving.bundle import golden_inputs

    products = golden_products(4)
    products[0] = ProductChange("upsert", "long", 0, 0, title=TITLES[0], description=" ".join(TITLES) * 3, price=2.0)
    products[1] = ProductChange("upsert", "short", 0, 0, title="Tee", price=2.0)
    files = featurizer_files(featurizer())
    shipped = load_bundle(real_bundle(tmp_path / "first", featurizer_files=files)).featurizer
    rows = shipped.transform(products)
    assert (rows.ids[0] != 0).all() and not (rows.ids[1] != 0).all()  # row 0 was cut to L features, row 1 not
    inputs = golden_inputs(products, description_chars=2 * shipped.config.max_description_chars)
    unused = int(next(i for i in range(1, shipped.n_buckets) if i not in set(rows.ids.ravel().tolist())))

    def bundle_with(name: str, row: int, position: int | None) -> Path:
        ids, weights = rows.ids.copy(), rows.weights.copy()
        ids[row] = ids[row][::-1]  # the same features in another order
        weights[row] = weights[row][::-1]
        if position is not None:
            ids[row, position] = unused
        golden = FeatureBatch(ids, weights, rows.numeric)
        return real_bundle(tmp_path / name, featurizer_files=files, golden_features=golden, golden_inputs=inputs)

    cut = int(np.argmin(rows.weights[0][::-1]))
    top = int(np.argmax(rows.weights[0][::-1]))
    assert not np.isclose(rows.weights[0].max(), rows.weights[0].min(), rtol=1e-4)
    validate_bundle(bundle_with("reordered", 0, None))
    validate_bundle(bundle_with("tie-at-cut", 0, cut))
    for name, row, position in (("heavy-feature", 0, top), ("uncut-row", 1, 0)):
        with pytest.raises(ModelRejectedError, match=r"does not reproduce the features of 1 of 4 golden rows"):
            validate_bundle(bundle_with(name, row, position))


def test_a_golden_product_with_a_long_description_keeps_what_the_featurizer_reads_and_the_bundle_small(
    tmp_path: Path,
) -> None:
    """Golden inputs were a UTF-32 array padded to the longest row, descriptions whole: one scraped 300,000-character
    description made golden.npz 73 MiB, over the bundle's file limit, so training wrote a bundle nothing could load."""
    products = golden_products(16)
    products[3] = ProductChange("upsert", "long", 0, 0, title=TITLES[0], description="长描述 " * 100_000, price=2.0)
    bundle = validate_bundle(_bundle_with_golden_products(tmp_path, products=products)).bundle
    assert (bundle.path / "golden.npz").stat().st_size < 200_000
    assert len(bundle.golden.inputs[3]["description"]) == 2 * bundle.featurizer.config.max_description_chars


def test_publish_refuses_a_bundle_whose_featurizer_does_not_make_its_golden_rows(tmp_path: Path) -> None:
    """Announced, it would be refused by every worker; `tagstream publish` says why at once, in one line."""
    from tagstream.errors import BundleError
    from training.publish import model_update_event

    event, _ = model_update_event(_bundle_with_golden_products(tmp_path / "good"))
    assert event.kind == "activate"
    bad = _bundle_with_golden_products(tmp_path / "other-seed", seed=777)
    with pytest.raises(BundleError, match=r"featurizer: does not reproduce the features of 16 of 16 golden rows"):
        model_update_event(bad)


def test_publish_refuses_a_bundle_whose_model_does_not_give_its_golden_scores(tmp_path: Path) -> None:
    """A model.onnx changed and its manifest hashed again passed `tagstream publish` (every checksum holds) and was
    announced; every worker then refused it. Publish now scores the golden rows, as the workers' canary does."""
    from tagstream.errors import BundleError
    from training.publish import model_update_event

    good = real_bundle(tmp_path / "good", seed=0)
    assert model_update_event(good)[0].kind == "activate"
    clean = np.load(good / "golden.npz")["scores"]
    bad = real_bundle(tmp_path / "bad", seed=0, golden_scores=np.clip(clean + 0.05, 0.0, 1.0))
    with pytest.raises(BundleError, match=r"golden: max \|score - golden\| = 0\.05 > 0\.0001"):
        model_update_event(bad)
