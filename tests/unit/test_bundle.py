"""Bundles: written atomically and immutably, loaded only when every check passes, each tampering named."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import stat
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper
from onnx.external_data_helper import set_external_data

from serving.bundle import (
    DEFAULT_LIMITS,
    BundleLimits,
    LabelMap,
    list_versions,
    load_bundle,
    read_manifest_bytes,
    write_bundle,
)
from tagstream.errors import BundleError, ModelRejectedError
from tests.tinymodel import (
    DEFAULT_LABELS,
    DEFAULT_THRESHOLDS,
    make_bundle,
    make_featurizer_spec,
    make_model,
    rewrite_manifest,
    tamper,
)

T = len(DEFAULT_LABELS["labels"])


def rejected(path: Path, **kwargs: object) -> list[str]:
    """The reasons load_bundle gives for refusing `path` (fails the test if it accepts it)."""
    with pytest.raises(ModelRejectedError) as info:
        load_bundle(path, **kwargs)  # type: ignore[arg-type]
    assert info.value.reasons, "a rejection must carry reasons"
    return info.value.reasons


def has(reasons: list[str], *fragments: str) -> bool:
    return any(all(f in r for f in fragments) for r in reasons)


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    return tmp_path / "registry"


@pytest.fixture
def bundle_dir(registry: Path) -> Path:
    return make_bundle(registry)


# ------------------------------------------------------------------------------------------------ round trip


def test_round_trip(bundle_dir: Path, registry: Path) -> None:
    b = load_bundle(bundle_dir)
    onnx_sha = hashlib.sha256((bundle_dir / "model.onnx").read_bytes()).hexdigest()
    assert b.model_version == bundle_dir.name == f"20260102T030405Z-{onnx_sha[:8]}"
    assert b.sha256 == hashlib.sha256((bundle_dir / "manifest.json").read_bytes()).hexdigest()
    assert b.onnx_bytes == (bundle_dir / "model.onnx").read_bytes()
    assert (b.L, b.K, b.T) == (16, 2, T)
    assert [x.tag for x in b.labels.labels][:3] == ["category:手机通讯", "category:Clothing", "category:手机通讯/手机"]
    assert b.labels.by_tag["category:手机通讯/手机"].parent == "category:手机通讯"
    assert b.thresholds.for_tag("style:sport") == 0.4 and b.thresholds.for_tag("style:casual") == 0.5
    assert b.golden.ids.shape == (64, 16) and b.golden.scores.shape == (64, T)
    assert not b.golden.scores.flags.writeable
    assert b.manifest["inputs"] == {"ids": ["int64", ["N", 16]], "weights": ["float32", ["N", 16]],
                                    "numeric": ["float32", ["N", 2]]}  # fmt: skip
    assert b.manifest["output"] == {"name": "scores", "shape": ["N", T]}
    assert b.manifest["onnx_opset"] == 17 and b.manifest["featurizer_version"] == "tiny-1"
    assert set(b.manifest["files"]) == {
        "model.onnx", "labels.json", "thresholds.json", "featurizer.json", "idf.npy", "metrics.json", "golden.npz"
    }  # fmt: skip
    assert not b.signed
    assert list_versions(registry) == [b.model_version]
    # written read-only and nothing left behind
    assert not (bundle_dir / "model.onnx").stat().st_mode & stat.S_IWUSR
    assert [p.name for p in registry.iterdir()] == [b.model_version]


def test_label_map_round_trips() -> None:
    labels = LabelMap.from_json(DEFAULT_LABELS)
    assert labels.to_json() == DEFAULT_LABELS
    assert labels.group_by_name["category_l2"].parent_group == "category_l1"


def test_versions_are_immutable(bundle_dir: Path, registry: Path) -> None:
    before = (bundle_dir / "manifest.json").read_bytes()
    with pytest.raises(BundleError, match="already exists"):
        make_bundle(registry)  # same time, same model: same version
    assert (bundle_dir / "manifest.json").read_bytes() == before
    assert [p.name for p in registry.iterdir()] == [bundle_dir.name]


def test_new_model_gets_new_version(bundle_dir: Path, registry: Path) -> None:
    other = make_bundle(registry, seed=5)
    assert other.name != bundle_dir.name
    assert list_versions(registry) == sorted([bundle_dir.name, other.name])


def test_write_refuses_invalid_bundle_and_leaves_nothing(registry: Path) -> None:
    bad = copy.deepcopy(DEFAULT_THRESHOLDS)
    bad["per_tag"]["colour:Purple"] = 0.7
    with pytest.raises(ModelRejectedError) as info:
        make_bundle(registry, thresholds=bad)
    assert has(info.value.reasons, "unknown tag", "colour:Purple")
    assert list(registry.iterdir()) == []


def test_a_bundle_is_readable_by_every_account_like_its_files(bundle_dir: Path) -> None:
    # before: the directory kept mkdtemp's 0700, so a worker or evaluate run by another user could not read it
    assert stat.S_IMODE(bundle_dir.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in bundle_dir.iterdir()} == {0o444}


def test_stale_temp_dirs_are_removed_but_never_one_a_live_writer_holds(registry: Path) -> None:
    import fcntl
    import os
    import time

    registry.mkdir(parents=True)
    dead, live, fresh = (registry / f".tmp-20260101T000000Z-0000000{i}-x" for i in range(3))
    for d in (dead, live, fresh):
        d.mkdir()
        (d / "model.onnx").write_bytes(b"half written")
    hour_ago = time.time() - 3600
    for d in (dead, live):  # untouched for an hour: a writer killed by SIGKILL, or one that holds its lock
        os.utime(d, (hour_ago, hour_ago))
    held = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # what a live write_bundle holds on its temp dir
        bundle = make_bundle(registry)
    finally:
        os.close(held)
    # before: the dead writer's directory stayed for good (67 MB each at the default size)
    assert sorted(p.name for p in registry.iterdir()) == sorted([bundle.name, live.name, fresh.name])
    assert (live / "model.onnx").is_file() and (fresh / "model.onnx").is_file()


def test_write_with_featurizer_callable(registry: Path) -> None:
    spec = make_featurizer_spec()

    def save(directory: Path) -> list[str]:
        (directory / "featurizer.json").write_text(json.dumps(spec))
        np.save(directory / "idf.npy", np.ones(64, dtype=np.float32))
        return ["featurizer.json", "idf.npy"]

    src = load_bundle(make_bundle(registry / "a"))
    path = write_bundle(
        registry / "b",
        onnx_bytes=src.onnx_bytes,
        labels=src.labels,
        thresholds=src.thresholds,
        featurizer_files=save,
        metrics={"micro_f1": 0.4},
        golden=src.golden,
        meta={"model_name": "tiny", "training_data_sha256": "ab" * 32, "git_commit": "abc123"},
    )
    b = load_bundle(path)
    assert "idf.npy" in b.manifest["files"] and b.manifest["git_commit"] == "abc123"
    assert b.featurizer_spec["max_features"] == 16


def test_meta_cannot_override_computed_fields(registry: Path) -> None:
    src = load_bundle(make_bundle(registry / "a"))
    with pytest.raises(BundleError, match="model_version"):
        write_bundle(
            registry / "b",
            onnx_bytes=src.onnx_bytes,
            labels=src.labels,
            thresholds=src.thresholds,
            featurizer_files={"featurizer.json": json.dumps(make_featurizer_spec()).encode()},
            metrics={},
            golden=src.golden,
            meta={"model_name": "x", "training_data_sha256": "0" * 64, "model_version": "mine"},
        )


# ------------------------------------------------------------------------------------------------ signatures


def test_signed_bundle_verifies(registry: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = make_bundle(registry, signing_key=key)
    assert load_bundle(path, verify_key=key.public_key()).signed
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert load_bundle(path, verify_key=pem).signed
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert load_bundle(path, verify_key=raw).signed


def test_unsigned_refused_when_key_configured(bundle_dir: Path) -> None:
    key = Ed25519PrivateKey.generate()
    assert has(rejected(bundle_dir, verify_key=key.public_key()), "manifest.sig", "unsigned")


def test_wrong_key_refused(registry: Path) -> None:
    path = make_bundle(registry, signing_key=Ed25519PrivateKey.generate())
    other = Ed25519PrivateKey.generate().public_key()
    assert has(rejected(path, verify_key=other), "manifest.sig", "does not verify")


def test_manifest_changed_after_signing_refused(registry: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = make_bundle(registry, signing_key=key)
    manifest = path / "manifest.json"
    data = json.loads(manifest.read_bytes())
    data["model_name"] = "evil"
    manifest.chmod(0o644)
    manifest.write_text(json.dumps(data))
    assert has(rejected(path, verify_key=key.public_key()), "manifest.sig", "does not verify")


def test_expected_sha256_must_match(bundle_dir: Path) -> None:
    good = hashlib.sha256((bundle_dir / "manifest.json").read_bytes()).hexdigest()
    assert load_bundle(bundle_dir, expected_sha256=good).sha256 == good
    assert has(rejected(bundle_dir, expected_sha256="0" * 64), "manifest.json", "expected")


# ------------------------------------------------------------------------------------------------ tampering


def test_wrong_checksum(bundle_dir: Path) -> None:
    tamper(bundle_dir, "thresholds.json", json.dumps({**DEFAULT_THRESHOLDS, "default": 0.1}).encode(),
           fix_manifest=False)  # fmt: skip
    reasons = rejected(bundle_dir)
    assert has(reasons, "thresholds.json", "sha256 mismatch")
    assert len(reasons) == 1


def test_unlisted_file(bundle_dir: Path) -> None:
    (bundle_dir / "extra.bin").write_bytes(b"x")
    assert has(rejected(bundle_dir), "extra.bin", "not listed")


def test_listed_file_missing(bundle_dir: Path) -> None:
    (bundle_dir / "metrics.json").unlink()
    assert has(rejected(bundle_dir), "metrics.json", "missing")


@pytest.mark.parametrize("name", ["manifest.json", "metrics.json"])
def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(bundle_dir: Path, name: str) -> None:
    (bundle_dir / name).unlink()
    os.mkfifo(bundle_dir / name)  # nobody writes it: opening it for reading would wait for a writer for good
    found: list[list[str]] = []
    reader = threading.Thread(target=lambda: found.append(rejected(bundle_dir)), daemon=True)
    reader.start()
    reader.join(60)  # not a speed check: a blocked reader never returns at all
    assert not reader.is_alive(), f"reading a bundle with a FIFO {name} blocked"
    assert has(found[0], name, "not a regular file")


def test_missing_manifest(bundle_dir: Path) -> None:
    (bundle_dir / "manifest.json").unlink()
    assert rejected(bundle_dir) == [f"{bundle_dir}: not a model bundle (manifest.json missing)"]


def test_a_registry_is_named_with_a_bundle_to_pass_instead(registry: Path, bundle_dir: Path) -> None:
    expected = f"{registry}: not a model bundle (manifest.json missing); pass a bundle directory such as {bundle_dir}"
    assert rejected(registry) == [expected]
    with pytest.raises(ModelRejectedError, match=re.escape(expected)):
        read_manifest_bytes(registry)  # the cheap check commands run before starting anything


def test_a_path_that_is_no_directory_is_named(tmp_path: Path, bundle_dir: Path) -> None:
    assert rejected(tmp_path / "nope") == [f"{tmp_path / 'nope'}: not a bundle directory (no such directory)"]
    a_file = bundle_dir / "labels.json"
    assert rejected(a_file) == [f"{a_file}: not a bundle directory (not a directory)"]
    assert read_manifest_bytes(bundle_dir) == (bundle_dir / "manifest.json").read_bytes()


@pytest.mark.parametrize("field", ["training_data_sha256", "model_version", "files", "output"])
def test_missing_manifest_field(bundle_dir: Path, field: str) -> None:
    rewrite_manifest(bundle_dir, mutate=lambda m: m.pop(field), fix_checksums=False)
    assert has(rejected(bundle_dir), "manifest.json", f"missing field '{field}'")


def test_model_version_must_match_onnx(bundle_dir: Path) -> None:
    rewrite_manifest(bundle_dir, mutate=lambda m: m.update(model_version="20260102T030405Z-00000000"))
    assert has(rejected(bundle_dir), "model_version", "sha256 prefix")


def test_truncated_onnx(bundle_dir: Path) -> None:
    data = (bundle_dir / "model.onnx").read_bytes()
    tamper(bundle_dir, "model.onnx", data[: len(data) // 2])
    reasons = rejected(bundle_dir)
    assert has(reasons, "model.onnx", "does not parse")


def _bad_model_bundle(registry: Path, model: onnx.ModelProto, **kwargs: object) -> Path:
    return make_bundle(registry, model=model, golden_scores=np.full((64, T), 0.5, np.float32), validate=False,
                       **kwargs)  # type: ignore[arg-type]  # fmt: skip


def test_external_data(registry: Path) -> None:
    model = make_model()
    tensor = next(t for t in model.graph.initializer if t.name == "dense_b")
    set_external_data(tensor, location="weights.bin")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    assert has(rejected(_bad_model_bundle(registry, model)), "dense_b", "external data")


def test_a_sparse_constant_whose_indices_are_external_data_is_refused(registry: Path) -> None:
    """The tensor walk missed a sparse constant's indices: only the ONNX checker stopped it, looking for the file
    relative to the validating process's working directory."""
    model = make_model()
    values = helper.make_tensor("sv", TensorProto.FLOAT, [1], [1.0])
    indices = helper.make_tensor("si", TensorProto.INT64, [1], np.zeros(1, np.int64).tobytes(), raw=True)
    set_external_data(indices, location="../../etc/passwd")
    indices.data_location = TensorProto.EXTERNAL
    indices.ClearField("raw_data")
    sparse = helper.make_sparse_tensor(values, indices, [4])
    model.graph.node.insert(0, helper.make_node("Constant", [], ["unused"], name="sparse_c", sparse_value=sparse))
    assert has(rejected(_bad_model_bundle(registry, model)), "sparse_c", "external data")


@pytest.mark.parametrize("name", ["labels.json", "thresholds.json", "metrics.json"])
def test_json_nested_deeper_than_python_parses_is_refused_with_a_reason(bundle_dir: Path, name: str) -> None:
    """A RecursionError escaped the loader: `tagstream publish` crashed with a traceback instead of one line."""
    tamper(bundle_dir, name, b"[" * 200_000 + b"]" * 200_000)
    assert has(rejected(bundle_dir), name, "RecursionError")


def test_unknown_operator_domain(registry: Path) -> None:
    model = make_model()
    last = next(n for n in model.graph.node if "scores" in n.output)
    last.output[0] = "pre"
    model.graph.node.append(helper.make_node("Boost", ["pre"], ["scores"], domain="com.example"))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    reasons = rejected(_bad_model_bundle(registry, model))
    assert has(reasons, "domain", "com.example")


def test_opset_too_new(registry: Path) -> None:
    model = make_model(opset=DEFAULT_LIMITS.max_opset + 1)
    reasons = rejected(_bad_model_bundle(registry, model))
    assert has(reasons, f"opset {DEFAULT_LIMITS.max_opset + 1} outside")


def test_opset_limits_are_configurable(bundle_dir: Path) -> None:
    assert has(rejected(bundle_dir, limits=BundleLimits(max_opset=16)), "opset 17 outside the allowed 13..16")


def test_onnx_size_limit(bundle_dir: Path) -> None:
    assert has(rejected(bundle_dir, limits=BundleLimits(max_onnx_bytes=100)), "model.onnx", "exceeds the limit")


def test_input_width_must_match_featurizer(registry: Path) -> None:
    model = make_model(L=8)  # the featurizer says L=16
    reasons = rejected(_bad_model_bundle(registry, model))
    assert has(reasons, "'ids' has width 8 but featurizer says 16")
    assert has(reasons, "'weights' has width 8 but featurizer says 16")


def test_a_dynamic_token_axis_must_be_named_l(registry: Path) -> None:
    assert load_bundle(make_bundle(registry / "ok", model=make_model(token_dim="L"))).L == 16
    reasons = rejected(_bad_model_bundle(registry, make_model(token_dim="tokens")))
    assert has(reasons, "'ids' has width 'tokens' but featurizer says 16 (or the dynamic 'L')")


def test_numeric_width_must_match_featurizer(bundle_dir: Path) -> None:
    spec = make_featurizer_spec(K=3)
    tamper(bundle_dir, "featurizer.json", json.dumps(spec).encode())
    assert has(rejected(bundle_dir), "'numeric' has width 2 but featurizer says 3")


def test_label_count_must_match_output(bundle_dir: Path) -> None:
    labels = copy.deepcopy(DEFAULT_LABELS)
    labels["labels"] = [x for x in labels["labels"] if x["tag"] != "colour:Navy Blue"]
    for i, x in enumerate(labels["labels"]):
        x["index"] = i
    tamper(bundle_dir, "labels.json", json.dumps(labels).encode())
    assert has(rejected(bundle_dir), f"'scores' has width {T} but labels.json says {T - 1}")


def test_huge_declared_dims(registry: Path) -> None:
    model = make_model()
    model.graph.value_info.append(helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 2**40]))
    assert has(rejected(_bad_model_bundle(registry, model)), "'pooled'", "beyond the limit")


def test_huge_constant_shape(registry: Path) -> None:
    model = make_model()
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([2**40], dtype=np.int64), "big_shape"))
    model.graph.node.append(helper.make_node("ConstantOfShape", ["big_shape"], ["boom"]))
    assert has(rejected(_bad_model_bundle(registry, model)), "ConstantOfShape", "beyond")


def test_fixed_batch_dimension_refused(registry: Path) -> None:
    model = make_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    assert has(rejected(_bad_model_bundle(registry, model)), "'ids'", "fixed batch dimension")


# ------------------------------------------------------------------------------------------------ labels, thresholds


def _labels_with(mutate: object) -> dict[str, object]:
    labels = copy.deepcopy(DEFAULT_LABELS)
    mutate(labels)  # type: ignore[operator]
    return labels


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda x: x["labels"][2].update(parent="category:Nope"), "unknown parent"),
        (lambda x: x["labels"][2].update(parent=None), "needs a parent"),
        (lambda x: x["labels"][5].update(group="material"), "unknown group"),
        (lambda x: x["labels"][3].update(index=7), "indices must be exactly 0..8"),
        (lambda x: x["labels"][6].update(tag="colour:Black"), "appears twice"),
        (lambda x: x["groups"][1].update(parent_group="shape"), "unknown parent_group"),
        (lambda x: x["groups"][3].update(kind="ranked"), "unknown kind"),
        (lambda x: x["labels"][2].update(parent="colour:Black"), "not in its group's parent_group"),
    ],
)
def test_label_map_inconsistencies(bundle_dir: Path, mutate: object, fragment: str) -> None:
    tamper(bundle_dir, "labels.json", json.dumps(_labels_with(mutate)).encode())
    assert has(rejected(bundle_dir), "labels.json", fragment)


@pytest.mark.parametrize(
    ("thresholds", "fragment"),
    [
        ({"format_version": 1, "default": 1.5, "per_tag": {}}, "default 1.5 is not a number in [0, 1]"),
        ({"format_version": 1, "default": 0.5, "per_tag": {"style:sport": -0.1}}, "-0.1 of 'style:sport'"),
        ({"format_version": 1, "default": 0.5, "per_tag": {"style:boho": 0.5}}, "unknown tag 'style:boho'"),
    ],
)
def test_bad_thresholds(bundle_dir: Path, thresholds: dict[str, object], fragment: str) -> None:
    tamper(bundle_dir, "thresholds.json", json.dumps(thresholds).encode())
    assert has(rejected(bundle_dir), "thresholds.json", fragment)


def test_golden_must_match_dims(bundle_dir: Path) -> None:
    import io

    buf = io.BytesIO()
    g = load_bundle(bundle_dir).golden
    np.savez(buf, ids=g.ids[:, :8], weights=g.weights, numeric=g.numeric, scores=g.scores)
    tamper(bundle_dir, "golden.npz", buf.getvalue())
    assert has(rejected(bundle_dir), "golden.npz", "ids has 8 columns, expected 16")


def test_all_reasons_are_collected(bundle_dir: Path) -> None:
    tamper(bundle_dir, "thresholds.json", b"{}", fix_manifest=False)
    (bundle_dir / "stray.txt").write_text("hi")
    rewrite_manifest(bundle_dir, mutate=lambda m: m.pop("created_at"), fix_checksums=False)
    reasons = rejected(bundle_dir)
    assert has(reasons, "thresholds.json", "sha256 mismatch")
    assert has(reasons, "stray.txt", "not listed")
    assert has(reasons, "missing field 'created_at'")


# ------------------------------------------------------------------------------------------------ refusals stay small


def test_a_bundle_with_thousands_of_problems_is_refused_with_a_short_list(bundle_dir: Path) -> None:
    """Every reason of 50,000 broken labels made a 2.9 MB refusal: too big for a Kafka answer or an error line."""
    from serving.bundle import MAX_REASONS

    labels = copy.deepcopy(DEFAULT_LABELS)
    labels["labels"] = [
        {"index": i, "tag": f"t{i}", "group": "nogroup", "value": "v", "parent": None} for i in range(50_000)
    ]
    tamper(bundle_dir, "labels.json", json.dumps(labels).encode())
    reasons = rejected(bundle_dir)
    assert len(reasons) == MAX_REASONS + 1 and reasons[-1].startswith("… and ")
    assert reasons[-1] == f"… and {50_000 - MAX_REASONS} more reasons"  # the others are counted
    assert has(reasons[:MAX_REASONS], "labels.json", "unknown group")
    assert len("; ".join(reasons).encode()) < 20_000


def test_capped_cuts_long_reasons_and_counts_the_rest() -> None:
    from serving.bundle import MAX_REASON_CHARS, capped

    assert capped(["a", "b"]) == ["a", "b"]
    out = capped([f"r{i}" for i in range(25)], limit=3)
    assert out == ["r0", "r1", "r2", "… and 22 more reasons"]
    assert capped(out, limit=3) == out and capped(out, limit=2) == ["r0", "r1", "… and 23 more reasons"]
    assert capped(["a", "b"], limit=1) == ["a", "… and 1 more reason"]
    [long] = capped(["x" * 10_000])
    assert len(long) == MAX_REASON_CHARS and long.endswith("…")


# ------------------------------------------------------------------------------------------------ malformed manifests


@pytest.mark.parametrize("shape", [5, None, {"n": 16}, "N,16"])
def test_a_manifest_input_shape_that_is_not_a_list_is_a_reason_not_a_crash(bundle_dir: Path, shape: object) -> None:
    """`"ids": ["int64", 5]` made load_bundle raise TypeError: `tagstream model activate` / `publish` showed a
    traceback instead of one error line."""
    rewrite_manifest(bundle_dir, mutate=lambda m: m["inputs"].update(ids=["int64", shape]))
    assert has(rejected(bundle_dir), "manifest.json: inputs", "do not describe the model's")


def test_a_manifest_files_null_is_a_reason_not_a_crash(bundle_dir: Path) -> None:
    rewrite_manifest(bundle_dir, mutate=lambda m: m.update(files=None), fix_checksums=False)
    assert has(rejected(bundle_dir), "manifest.json: 'files' is not an object")


# ------------------------------------------------------------------------------------------------ featurizer assets


def _real_bundle(registry: Path) -> Path:
    from tests.unit.test_validate import real_bundle

    return real_bundle(registry)


def test_a_featurizer_asset_the_manifest_does_not_list_is_refused(registry: Path) -> None:
    """featurizer.json names known.npy, the bundle has none and its manifest was re-hashed without it: load_bundle
    (all `publish` checks) accepted it, and every worker refused it when its featurizer read the file."""
    path = _real_bundle(registry)
    spec = json.loads((path / "featurizer.json").read_bytes())
    assert spec["assets"]["known"] == "known.npy" and spec["known_only"]
    (path / "known.npy").chmod(0o644)
    (path / "known.npy").unlink()
    rewrite_manifest(path)  # consistent again, but without known.npy
    assert has(rejected(path), "featurizer.json: asset 'known' is 'known.npy', a file the manifest does not list")


@pytest.mark.parametrize(
    ("assets", "fragment"),
    [
        ({"idf": "other.npy"}, "asset 'idf' is 'other.npy'"),
        ({}, "known_only is set but no 'known' asset"),  # idf.npy by default, like the featurizer reads it
        ("idf.npy", "is not an object of asset to file name"),
        ({"idf": 5}, "is not an object of asset to file name"),
        (["idf.npy", "known.npy"], "is not an object of asset to file name"),  # accepted, then refused by every worker
    ],
)
def test_featurizer_assets_must_be_files_of_the_bundle(registry: Path, assets: object, fragment: str) -> None:
    path = _real_bundle(registry)
    spec = json.loads((path / "featurizer.json").read_bytes())
    tamper(path, "featurizer.json", json.dumps({**spec, "assets": assets}).encode())
    assert has(rejected(path), "featurizer.json", fragment)


def test_a_real_bundle_names_only_files_it_has(registry: Path) -> None:
    load_bundle(_real_bundle(registry))  # idf.npy and known.npy, both listed


@pytest.mark.parametrize("command", [["model", "activate"], ["model", "shadow"], ["publish"]])
@pytest.mark.parametrize("broken", ["input shape", "featurizer asset"])
def test_commands_refuse_such_bundles_in_one_line(
    registry: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: list[str], broken: str
) -> None:
    """`tagstream model activate|shadow` and `publish` check a bundle first: a traceback before (input shape), an
    announcement of a bundle every worker refuses (featurizer asset)."""
    from tagstream.cli import main

    monkeypatch.setenv("TAGSTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:1")  # nothing may be sent, whatever happens
    path = _real_bundle(registry)
    if broken == "input shape":
        rewrite_manifest(path, mutate=lambda m: m["inputs"].update(ids=["int64", 5]))
        expected = "manifest.json: inputs"
    else:
        (path / "known.npy").chmod(0o644)
        (path / "known.npy").unlink()
        rewrite_manifest(path)
        expected = "featurizer.json: asset 'known' is 'known.npy', a file the manifest does not list"
    assert main([*command, "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("tagstream ")]
    assert line.startswith(f"tagstream {command[0]}: error: ") and expected in line, line
