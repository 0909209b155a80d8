"""OnnxScorer: lifecycle, scores equal to the reference, refusal of broken outputs, canary and latency."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from serving.bundle import ModelBundle, load_bundle
from serving.scorer import OnnxScorer, trim_padding
from tagstream.errors import ConfigError, ModelLoadError, ModelNotLoadedError, ModelRejectedError, ScoringError
from tests.tinymodel import DEFAULT_LABELS, make_bundle, make_feature_batch, make_model, run_model

T = len(DEFAULT_LABELS["labels"])


@pytest.fixture
def bundle(tmp_path: Path) -> ModelBundle:
    return load_bundle(make_bundle(tmp_path / "registry"))


@pytest.fixture
def scorer(bundle: ModelBundle) -> OnnxScorer:
    s = OnnxScorer(intra_op_num_threads=1, inter_op_num_threads=1)
    s.load(bundle)
    return s


def poisoned_bundle(tmp_path: Path, poison: str) -> ModelBundle:
    model = make_model(poison=poison)  # type: ignore[arg-type]
    path = make_bundle(tmp_path / poison, model=model, golden_scores=np.full((64, T), 0.5, np.float32))
    return load_bundle(path)


def test_predict_before_load_raises() -> None:
    with pytest.raises(ModelNotLoadedError):
        OnnxScorer().predict(make_feature_batch(2))


def test_predict_after_unload_raises(scorer: OnnxScorer) -> None:
    scorer.unload()
    assert not scorer.loaded and scorer.model_version is None
    with pytest.raises(ModelNotLoadedError):
        scorer.predict(make_feature_batch(2))


def test_predict_matches_reference(scorer: OnnxScorer, bundle: ModelBundle) -> None:
    batch = make_feature_batch(37)
    scores = scorer.predict(batch)
    assert scores.shape == (37, T) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, run_model(bundle.onnx_bytes, batch), atol=1e-6)
    # softmax groups sum to one: category_l1 is columns 0..1, colour 5..6
    np.testing.assert_allclose(scores[:, [0, 1]].sum(axis=1), 1.0, atol=1e-5)
    assert scorer.model_version == bundle.model_version


def test_predict_accepts_mapping_and_other_dtypes(scorer: OnnxScorer) -> None:
    b = make_feature_batch(4)
    as_map = {"ids": b.ids.astype(np.int32), "weights": b.weights.astype(np.float64), "numeric": b.numeric.tolist()}
    np.testing.assert_allclose(scorer.predict(as_map), scorer.predict(b), atol=1e-6)


def test_empty_batch(scorer: OnnxScorer) -> None:
    assert scorer.predict(make_feature_batch(0)).shape == (0, T)


def test_large_batch_is_chunked_identically(bundle: ModelBundle) -> None:
    small_runs = OnnxScorer(max_rows_per_run=7)
    small_runs.load(bundle)
    batch = make_feature_batch(50)
    one = OnnxScorer()
    one.load(bundle)
    np.testing.assert_allclose(small_runs.predict(batch), one.predict(batch), atol=1e-6)


def test_a_dynamic_token_axis_scores_like_the_full_width_from_the_used_columns_only(tmp_path: Path) -> None:
    fixed, dynamic = OnnxScorer(), OnnxScorer()
    fixed.load(load_bundle(make_bundle(tmp_path / "fixed", model=make_model(seed=3))))
    dynamic.load(load_bundle(make_bundle(tmp_path / "dynamic", model=make_model(seed=3, token_dim="L"))))
    batch = make_feature_batch(6, seed=5)
    batch.weights[:, 10:] = 0.0  # every row's padding starts by column 10 (ids there stay non-zero),
    batch.weights[1:, 6:] = 0.0  # most rows use 6 columns,
    batch.weights[0, 2:9] = 0.0  # and row 0 has zero-weight columns before its last used one (column 9)
    widths: list[int] = []
    session = dynamic._state.session  # type: ignore[union-attr]

    class Recording:
        def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            widths.append(feeds["ids"].shape[1])
            return session.run(names, feeds)

    dynamic._state = dynamic._state._replace(session=Recording())  # type: ignore[union-attr]
    np.testing.assert_allclose(dynamic.predict(batch), fixed.predict(batch), atol=1e-6)
    empty = make_feature_batch(2, seed=6)
    empty.weights[:] = 0.0
    np.testing.assert_allclose(dynamic.predict(empty), fixed.predict(empty), atol=1e-6)
    assert widths == [10, 1]


def test_wrong_input_shape(scorer: OnnxScorer) -> None:
    with pytest.raises(ScoringError, match="do not match"):
        scorer.predict(make_feature_batch(3, L=8))
    b = make_feature_batch(3)
    with pytest.raises(ScoringError, match="do not match"):
        scorer.predict({"ids": b.ids, "weights": b.weights[:2], "numeric": b.numeric})


def test_onnx_runtime_failure_is_scoring_error(scorer: OnnxScorer) -> None:
    b = make_feature_batch(2)
    bad_ids = b.ids.copy()
    bad_ids[0, 0] = 10_000  # outside the embedding table
    with pytest.raises(ScoringError, match="ONNX Runtime failed"):
        scorer.predict({"ids": bad_ids, "weights": b.weights, "numeric": b.numeric})


@pytest.mark.parametrize("bad", [-0.5, float("nan")])
def test_negative_or_nan_weights_are_refused(scorer: OnnxScorer, bad: float) -> None:
    """The exported bag writes weights as unsigned digits: a negative weight would score as garbage, not fail."""
    b = make_feature_batch(3)
    weights = b.weights.copy()
    weights[1, 0] = bad
    with pytest.raises(ScoringError, match="weights must be >= 0"):
        scorer.predict({"ids": b.ids, "weights": weights, "numeric": b.numeric})


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_non_finite_scores_raise(tmp_path: Path, poison: str) -> None:
    s = OnnxScorer()
    s.load(poisoned_bundle(tmp_path, poison))
    with pytest.raises(ScoringError, match="NaN or inf"):
        s.predict(make_feature_batch(3))


def test_failed_load_keeps_previous_model(scorer: OnnxScorer, bundle: ModelBundle) -> None:
    broken = dataclasses.replace(bundle, onnx_bytes=b"not a model", model_version="broken")
    with pytest.raises(ModelLoadError, match="broken"):
        scorer.load(broken)
    assert scorer.model_version == bundle.model_version
    assert scorer.predict(make_feature_batch(1)).shape == (1, T)


def test_check_golden_passes_for_own_bundle(scorer: OnnxScorer) -> None:
    assert scorer.check_golden(atol=1e-4) <= 1e-4


def test_check_golden_rejects_drift(tmp_path: Path, bundle: ModelBundle) -> None:
    drifted = load_bundle(make_bundle(tmp_path / "drift", golden_scores=np.clip(bundle.golden.scores + 0.01, 0, 1)))
    s = OnnxScorer()
    s.load(drifted)
    with pytest.raises(ModelRejectedError, match="golden"):
        s.check_golden(atol=1e-4)
    assert s.check_golden(atol=0.02) <= 0.02


def test_check_golden_rejects_nan_model(tmp_path: Path) -> None:
    s = OnnxScorer()
    s.load(poisoned_bundle(tmp_path, "nan"))
    with pytest.raises(ModelRejectedError, match="scoring the golden rows failed"):
        s.check_golden()


def test_check_golden_needs_a_model(bundle: ModelBundle) -> None:
    with pytest.raises(ModelNotLoadedError):
        OnnxScorer().check_golden(bundle)


def test_measure_latency(scorer: OnnxScorer) -> None:
    stats = scorer.measure_latency((1, 64), runs=5)
    assert set(stats) == {1, 64}
    assert all(0 < s.p50_ms <= s.max_ms and s.rows_per_s > 0 for s in stats.values())


def test_session_options_follow_arguments() -> None:
    so = OnnxScorer(intra_op_num_threads=2, inter_op_num_threads=1).session_options()
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (2, 1)
    with pytest.raises(ConfigError):
        OnnxScorer(intra_op_num_threads=0)


async def test_async_load_and_predict(bundle: ModelBundle) -> None:
    s = OnnxScorer()
    with ThreadPoolExecutor(max_workers=1) as pool:
        await s.aload(bundle, pool)
        scores = await s.apredict(make_feature_batch(5), pool)
    assert scores.shape == (5, T)
    np.testing.assert_allclose(scores, s.predict(make_feature_batch(5)), atol=1e-6)


def test_load_file_scores_like_load_and_refuses_a_changed_file(scorer: OnnxScorer, bundle: ModelBundle) -> None:
    sha = bundle.manifest["files"]["model.onnx"]
    from_file = OnnxScorer(intra_op_num_threads=1, inter_op_num_threads=1)
    from_file.load_file(dataclasses.replace(bundle, onnx_bytes=b""), sha)
    batch = make_feature_batch(32, seed=3)
    np.testing.assert_array_equal(from_file.predict(batch), scorer.predict(batch))

    model_file = bundle.path / "model.onnx"
    model_file.chmod(0o644)
    model_file.write_bytes(model_file.read_bytes() + b"\x00")  # changed after validation
    with pytest.raises(ModelLoadError, match="changed"):
        from_file.load_file(dataclasses.replace(bundle, onnx_bytes=b""), sha)
    np.testing.assert_array_equal(from_file.predict(batch), scorer.predict(batch))  # the loaded model stays


def test_padding_is_trimmed_only_for_a_dynamic_token_axis(tmp_path: Path) -> None:
    fixed, dynamic = OnnxScorer(), OnnxScorer()
    assert fixed.trims_padding is False  # nothing loaded
    fixed.load(load_bundle(make_bundle(tmp_path / "fixed")))
    dynamic.load(load_bundle(make_bundle(tmp_path / "dynamic", model=make_model(token_dim="L"))))
    assert fixed.trims_padding is False and dynamic.trims_padding is True
    batch = make_feature_batch(4)
    weights = batch.weights.copy()
    weights[:, 5:] = 0.0
    weights[2, 9] = 0.5  # one row reaches column 9: columns 10.. are unused by every row
    ids, trimmed = trim_padding(batch.ids, weights)
    assert ids.shape == trimmed.shape == (4, 10) and np.array_equal(trimmed, weights[:, :10])
    assert np.array_equal(ids, batch.ids[:, :10])
    full = np.ones_like(weights)
    assert trim_padding(batch.ids, full)[1] is full  # every column used: unchanged
    assert trim_padding(batch.ids, np.zeros_like(weights))[0].shape == (4, 1)  # an all-zero batch keeps one column
