"""`train --every`: the fixed evaluation set, the not-worse gate and a failing cycle (no TensorFlow: fakes)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from training.catalog import CatalogProduct
from training.loaders import load_catalog
from training.publish import compare_reports, eval_holdout, periodic_retrain
from training.settings import TrainerSettings

LEAVES = ["运动|运动鞋|跑步鞋", "手机通讯|手机|智能手机", "服饰|上衣|衬衫", "食品|饮料|茶"]


def _jd_rows(n: int) -> list[str]:
    return [
        f"10050090{i % 4},{LEAVES[i % 4]},品牌{i} 新款 型号{i * 7919 % 10007},服饰内衣>运动>跑步鞋,京东商城,店{i % 9}"
        for i in range(n)
    ]


def _split(path: Path) -> tuple[set[str], set[str]]:
    products = load_catalog(path, "cn-jd").products
    held = eval_holdout(products)
    return (
        {p.title for p, h in zip(products, held, strict=True) if h},
        {p.title for p, h in zip(products, held, strict=True) if not h},
    )


def test_the_evaluation_set_stays_put_when_a_jd_row_is_removed(tmp_path: Path) -> None:
    rows = _jd_rows(600)
    before, after = tmp_path / "before.csv", tmp_path / "after.csv"
    before.write_text("\n".join(rows) + "\n", encoding="utf-8")
    after.write_text("\n".join(rows[1:]) + "\n", encoding="utf-8")  # cn-jd ids are line numbers: all shift by one
    eval_1, train_1 = _split(before)
    eval_2, _ = _split(after)
    assert 30 <= len(eval_1) <= 90
    assert eval_2 <= eval_1 and len(eval_2) >= len(eval_1) - 1  # the same products, less the removed one at most
    assert not eval_2 & train_1  # nothing the current model trained on is evaluated as unseen


def test_the_gate_refuses_a_candidate_that_lost_a_group_the_current_model_has() -> None:
    current = {"groups": {"category_l1": {"weighted_f1": 0.90}, "colour": {"weighted_f1": 0.80}}}
    lost = compare_reports({"groups": {"category_l1": {"weighted_f1": 0.95}}}, current)
    assert not lost.publish
    assert any("colour" in r and "lacks" in r for r in lost.reasons), lost.reasons
    gained = {"groups": {**current["groups"], "gender": {"weighted_f1": 0.5}}}
    assert compare_reports(gained, current).publish  # a new group is not worse
    unevaluated = {"groups": {"category_l1": {"weighted_f1": 0.90}, "colour": {"weighted_f1": None}}}
    assert compare_reports({"groups": {"category_l1": {"weighted_f1": 0.90}}}, unevaluated).publish


def _cycles_of(registry: Path, train_fn, cycles: int) -> tuple[list[dict], list[Path]]:
    """`periodic_retrain` over 60 products with `train_fn` and every bundle evaluated alike (category_l2 0.5): its
    records and what it published."""
    alike = {"groups": {"category_l2": {"weighted_f1": 0.5}}}
    return _periodic(registry, cycles, train_fn, lambda bundle, eval_set: alike)


def _periodic(registry: Path, cycles: int, train_fn, evaluate_fn, **kw) -> tuple[list[dict], list[Path]]:
    """`periodic_retrain` over 60 products, every cycle at once, with `train_fn` and `evaluate_fn`: its records and
    what it published."""
    products = [CatalogProduct(f"p{i}", f"title {i}", category_path=("A", f"B{i % 3}")) for i in range(60)]
    published: list[Path] = []
    records = periodic_retrain(
        lambda: products,
        TrainerSettings(),
        every_s=0.0,
        registry=registry,
        max_cycles=cycles,
        publish=published.append,
        train_fn=train_fn,
        evaluate_fn=evaluate_fn,
        sleep=lambda s: None,
        **kw,
    )
    return records, published


def test_a_cycle_that_fails_with_an_os_error_is_logged_and_the_loop_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    def train_fn(products, settings, *, registry, split) -> Path:
        calls.append(1)
        if len(calls) == 1:
            raise FileNotFoundError(2, "No such file or directory", "/nonexistent")
        return tmp_path / f"b{len(calls)}"

    with caplog.at_level(logging.ERROR, logger="training.publish"):
        records, published = _cycles_of(tmp_path, train_fn, 2)
    assert "/nonexistent" in records[0]["error"] and records[0]["publish"] is False
    assert records[1]["publish"] is True and published == [tmp_path / "b2"]
    assert "retrain cycle 1 failed" in caplog.text


# ---------------------------------------------------------------- the current model across restarts and removals


def _fake_cycles(
    registry: Path,
    quality: dict[str, float],
    cycles: int,
    *,
    gone_after: dict[int, str] | None = None,
    on_cycle=None,
) -> tuple[list[dict], list[Path]]:
    """`periodic_retrain` with fake training (candidates c0, c1, … in `registry`) and evaluation (`quality` by
    bundle name; a bundle not in it, or named in `gone_after` from that cycle on, is refused as missing)."""
    from tagstream.errors import ModelRejectedError

    made: list[Path] = []
    gone: set[str] = set()

    def train_fn(products, settings, *, registry, split) -> Path:
        gone.update(v for k, v in (gone_after or {}).items() if k <= len(made) + 1)
        made.append(registry / f"c{len(made)}")
        return made[-1]

    def evaluate_fn(bundle: Path, eval_set) -> dict:
        if bundle.name in gone or bundle.name not in quality:
            raise ModelRejectedError([f"{bundle}: not a bundle directory (no such directory)"])
        return {"groups": {"category_l1": {"weighted_f1": quality[bundle.name]}}}

    return _periodic(registry, cycles, train_fn, evaluate_fn, **({"on_cycle": on_cycle} if on_cycle else {}))


def _registry_of_two(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A registry holding two valid bundles: (registry, the older by version, the newer)."""
    from tests.models import featurized_bundle

    registry = tmp_path / "registry"
    older, newer = sorted([featurized_bundle(registry, seed=0), featurized_bundle(registry, seed=1)])
    return registry, older, newer


def test_a_restarted_trainer_compares_its_first_model_with_the_one_last_published(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from training.publish import model_update_event, record_publication

    registry, published_before, newest = _registry_of_two(tmp_path)
    record_publication(published_before, model_update_event(published_before)[0])  # as `tagstream publish` does
    quality = {published_before.name: 0.9, newest.name: 0.1, "c0": 0.5}
    with caplog.at_level(logging.INFO, logger="training.publish"):
        records, published = _fake_cycles(registry, quality, 1)
    # before: "no current model", and the 0.5 model was published over the 0.9 one
    assert records[0]["current"] == str(published_before) and records[0]["publish"] is False, records
    assert published == [] and "the last bundle of" in caplog.text


def test_without_a_publication_record_the_newest_valid_bundle_is_the_current_model_and_it_is_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry, _, newest = _registry_of_two(tmp_path)
    (registry / "29991231T000000Z-0badbeef").mkdir()  # newer by name, but no bundle: skipped
    with caplog.at_level(logging.INFO, logger="training.publish"):
        records, published = _fake_cycles(registry, {newest.name: 0.7, "c0": 0.6}, 1)
    assert published == []
    assert records[0]["current"] == str(newest) and records[0]["publish"] is False
    assert "may be one that was never published" in caplog.text


def test_when_the_current_bundle_disappears_the_gate_keeps_its_last_evaluation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # c0 is published in cycle 1, then removed from the registry: c1 (worse than c0 was) is kept out, c2 published
    with caplog.at_level(logging.WARNING, logger="training.publish"):
        records, published = _fake_cycles(tmp_path, {"c0": 0.8, "c1": 0.6, "c2": 0.85}, 3, gone_after={2: "c0"})
    # before: cycles 2 and 3 failed on the missing bundle, forever, and their records named no bundle
    assert [r["publish"] for r in records] == [True, False, True], records
    assert [r["bundle"] for r in records] == [str(tmp_path / f"c{i}") for i in range(3)]
    assert "error" not in records[1] and any("0.6 < 0.8" in r for r in records[1]["reasons"])
    assert published == [tmp_path / "c0", tmp_path / "c2"]
    assert "c0 cannot be evaluated" in caplog.text and "comparing with its last evaluation" in caplog.text


def test_each_cycle_record_is_handed_over_as_soon_as_the_cycle_ends(tmp_path: Path) -> None:
    seen: list[int] = []
    records, _ = _fake_cycles(tmp_path, {"c0": 0.5, "c1": 0.5}, 2, on_cycle=lambda r: seen.append(r["cycle"]))
    assert seen == [1, 2] and [r["cycle"] for r in records] == [1, 2]


@pytest.mark.parametrize("text", ["200000d", "367d", "40000000"])
def test_a_period_too_long_to_sleep_is_refused_at_once(text: str) -> None:
    from tagstream.errors import ConfigError
    from training.publish import parse_duration

    # before: accepted, and after a whole cycle `sleep` raised OverflowError (a traceback)
    with pytest.raises(ConfigError, match="at most 366d"):
        parse_duration(text)
    assert parse_duration("366d") == 366 * 86400


# ---------------------------------------------------------------- publish checks the signature the workers check


def test_publish_refuses_a_bundle_whose_signature_the_configured_verify_key_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from tagstream.errors import ModelRejectedError
    from tests.tinymodel import make_bundle, rewrite_manifest
    from training.publish import model_update_event

    key = Ed25519PrivateKey.generate()
    bundle = make_bundle(tmp_path / "registry", signing_key=key)
    public = base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
    monkeypatch.setenv("TAGSTREAM_MODEL_VERIFY_KEY", public)
    assert model_update_event(bundle)[0].signature  # signed with the key the workers verify with: sent
    signature = (bundle / "manifest.sig").read_bytes()
    rewrite_manifest(bundle, mutate=lambda m: m.update(model_name="other-tagger"))  # edited after signing
    (bundle / "manifest.sig").write_bytes(signature)
    # before: the event was built and sent; only the workers refused it
    with pytest.raises(ModelRejectedError, match="signature does not verify"):
        model_update_event(bundle)
    monkeypatch.delenv("TAGSTREAM_MODEL_VERIFY_KEY")
    assert model_update_event(bundle)[1] == "other-tagger"  # without the key, as the workers without it


# ---------------------------------------------------------------- a cycle that fails unexpectedly


def test_an_unexpected_error_in_a_cycle_is_logged_with_its_traceback_and_the_next_cycle_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made: list[Path] = []

    def train_fn(products, settings, *, registry, split) -> Path:
        made.append(registry / f"c{len(made)}")
        if len(made) == 2:
            raise KeyError("weighted_f1")  # as a group missing from the validation split raised during the fit
        return made[-1]

    with caplog.at_level(logging.ERROR, logger="training.publish"):
        records, published = _cycles_of(tmp_path, train_fn, 3)
    # before: the KeyError ended `train --every` (a traceback, exit 1) before any JSON line of the failed cycle
    assert [r["cycle"] for r in records] == [1, 2, 3]
    assert records[1]["publish"] is False and records[1]["error"] == "KeyError: 'weighted_f1'"
    assert records[2]["publish"] is True and published == [made[0], made[2]]
    failed = [r for r in caplog.records if "retrain cycle 2 failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None and "Traceback" in caplog.text


def test_a_failed_cycle_still_names_the_current_model_and_where_it_came_from(tmp_path: Path) -> None:
    calls: list[int] = []

    def train_fn(products, settings, *, registry, split) -> Path:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return registry / f"d{len(calls)}"

    records, _ = _cycles_of(tmp_path, train_fn, 2)
    # before: the failed cycle's JSON line had neither `current` nor `current_from`
    assert "No space left" in records[1]["error"]
    assert records[1]["current"] == str(tmp_path / "d1")
    assert records[1]["current_from"] == "published by this run"


# ---------------------------------------------------------------- a fair gate: products neither model trained on


def _published_bundle_trained_on(registry: Path, trained_on: list[CatalogProduct] | None) -> Path:
    """A valid bundle recorded in the registry's published.jsonl whose metrics.json records `trained_on` (None: no
    record, as a bundle written before tagstream kept one)."""
    import json

    from tests.models import featurized_bundle
    from tests.tinymodel import tamper
    from training.publish import model_update_event, record_publication
    from training.splits import trained_on_record

    bundle = featurized_bundle(registry)
    if trained_on is not None:
        tamper(bundle, "metrics.json", json.dumps({"trained_on": trained_on_record(trained_on)}).encode())
    record_publication(bundle, model_update_event(bundle)[0])
    return bundle


GATE_PRODUCTS = [CatalogProduct(f"p{i}", f"gate title {i}", category_path=("A", f"B{i % 3}")) for i in range(600)]


def _gate_cycle(registry: Path, current_saw: set[str], settings: TrainerSettings) -> tuple[dict, dict[str, list]]:
    """One `periodic_retrain` cycle over GATE_PRODUCTS against the published current model, which scores 1.0 on the
    products it trained on (`current_saw`, by title: it learnt them) and 0.5 on the others; the candidate scores 0.7
    everywhere. Returns the cycle's record and the titles each model was evaluated on."""
    seen: dict[str, list] = {}

    def evaluate_fn(bundle: Path, products) -> dict:
        seen[bundle.name] = [p.title for p in products]
        if bundle.name == "cand":
            return {"groups": {"category_l2": {"weighted_f1": 0.7, "n_unknown": 0}}}
        score = sum(1.0 if p.title in current_saw else 0.5 for p in products) / max(1, len(products))
        return {"groups": {"category_l2": {"weighted_f1": round(score, 4), "n_unknown": 0}}}

    records = periodic_retrain(
        lambda: GATE_PRODUCTS,
        settings,
        every_s=0.0,
        registry=registry,
        max_cycles=1,
        publish=lambda bundle: None,
        train_fn=lambda products, settings, *, registry, split: registry / "cand",
        evaluate_fn=evaluate_fn,
        sleep=lambda s: None,
    )
    return records[0], seen


def test_the_gate_compares_on_evaluation_products_neither_model_trained_on(tmp_path: Path) -> None:
    held = eval_holdout(GATE_PRODUCTS)
    eval_set = [p for p, h in zip(GATE_PRODUCTS, held, strict=True) if h]
    rest = [p for p, h in zip(GATE_PRODUCTS, held, strict=True) if not h]
    learnt = eval_set[: len(eval_set) // 2]  # a single `tagstream train` run trains on most of the evaluation set
    current = _published_bundle_trained_on(tmp_path, rest + learnt)
    record, seen = _gate_cycle(tmp_path, {p.title for p in rest + learnt}, TrainerSettings(gate_min_products=10))
    unseen = {p.title for p in eval_set[len(learnt) :]}
    # before: both were scored on the whole evaluation set, where the current model had learnt half the products
    # (0.75 against the candidate's 0.7), and the candidate was refused
    assert record["current"] == str(current) and record["publish"] is True, record
    assert set(seen["cand"]) == unseen and set(seen[current.name]) == unseen
    assert record["gate"] == {
        "evaluation_set": len(eval_set),
        "compared_on": len(unseen),
        "current_trained_on": len(learnt),
        "fair": True,
    }


def test_too_few_products_unseen_by_both_models_is_said_and_compared_on_the_whole_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    held = eval_holdout(GATE_PRODUCTS)
    eval_set = [p for p, h in zip(GATE_PRODUCTS, held, strict=True) if h]
    learnt = eval_set[:-3]
    _published_bundle_trained_on(tmp_path, learnt)
    with caplog.at_level(logging.WARNING, logger="training.publish"):
        record, seen = _gate_cycle(tmp_path, {p.title for p in learnt}, TrainerSettings(gate_min_products=30))
    gate = record["gate"]
    assert gate["compared_on"] == gate["evaluation_set"] == len(eval_set) and gate["current_trained_on"] == len(learnt)
    assert (
        gate["fair"] is False and "only 3 of the" in gate["note"] and "TAGSTREAM_GATE_MIN_PRODUCTS=30" in gate["note"]
    )
    assert len(seen["cand"]) == len(eval_set)  # the whole set, which favours the current model: refused here
    assert record["publish"] is False and "only 3 of the" in caplog.text


def test_a_current_bundle_without_a_training_record_is_compared_on_the_whole_set_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    current = _published_bundle_trained_on(tmp_path, None)
    with caplog.at_level(logging.WARNING, logger="training.publish"):
        record, seen = _gate_cycle(tmp_path, set(), TrainerSettings())
    assert record["current"] == str(current) and record["publish"] is True
    assert record["gate"]["fair"] is False and record["gate"]["current_trained_on"] is None
    assert "keeps no record of the products it trained on" in record["gate"]["note"]
    assert len(seen["cand"]) == record["gate"]["evaluation_set"] and "keeps no record" in caplog.text


def test_a_bundle_records_the_products_it_trained_on_in_its_manifested_metrics() -> None:
    from training.publish import bundle_trained_on
    from training.splits import read_trained_on, trained_on_key, trained_on_record

    record = trained_on_record(GATE_PRODUCTS[:100])
    assert record["n"] == 100 and len(record["hashes"]) < 100 * 12  # 8 bytes a product, base64
    assert read_trained_on(record) == {trained_on_key(p) for p in GATE_PRODUCTS[:100]}
    assert read_trained_on(None) is None and bundle_trained_on(Path("/nonexistent")) is None


def test_a_plain_train_holds_out_the_products_the_every_gate_compares_on() -> None:
    # `tagstream train` split 80/10/10 at random: its model trained on ~90 % of the gate's evaluation set, so the
    # README's flow (train, publish, then --every) was compared on the whole set, in the current model's favour
    from training.splits import holdout_split

    split = holdout_split(GATE_PRODUCTS, validation=0.1, test=0.1, seed=0)
    held = eval_holdout(GATE_PRODUCTS)
    assert sorted(split.test_idx.tolist()) == [i for i, h in enumerate(held) if h] and len(split.test_idx) > 0
    shaped = {*split.train_idx.tolist(), *split.validation_idx.tolist()}
    assert not shaped & set(split.test_idx.tolist()) and len(shaped) + len(split.test_idx) == len(GATE_PRODUCTS)
    assert len(split.validation_idx) > 0


# ---------------------------------------------------------------- a current model that knows none of the labels


def test_a_current_model_that_knows_none_of_the_catalogs_labels_does_not_block_every_candidate(tmp_path: Path) -> None:
    from tests.models import featurized_bundle
    from training.train import evaluate_bundle

    # the taxonomy was renamed: the current model (labels: tests.tinymodel.DEFAULT_LABELS) knows none of them
    renamed = [
        CatalogProduct(
            f"r{i}", f"product {i}", category_path=("New Phones", "New Mobiles"), attributes={"colour": "Jet"}
        )
        for i in range(12)
    ]
    current = evaluate_bundle(featurized_bundle(tmp_path), renamed)
    assert all(g.get("weighted_f1") is None and g["n_unknown"] == 12 for g in current["groups"].values())
    candidate = {"groups": {g: {"weighted_f1": 0.6, "n_unknown": 0} for g in current["groups"]}}
    decision = compare_reports(candidate, current)
    # before: "no group in common with the current model", refused at every cycle, forever
    assert decision.publish, decision.reasons
    assert any("knows none of the labels of the 12 products" in r for r in decision.reasons), decision.reasons


def test_on_a_catalog_of_free_tags_only_the_served_tags_are_compared() -> None:
    # no exclusive group at all, only the served free tags: "no group in common with the current model" refused
    # every candidate after the first publication; then a candidate at 0.4 replaced a current model at 0.9
    current = {"groups": {}, "served": {"groups": {"tags": {"weighted_f1": 0.9}}}}
    worse = {"groups": {}, "served": {"groups": {"tags": {"weighted_f1": 0.4}}}}
    decision = compare_reports(worse, current)
    assert not decision.publish and decision.reasons == ("served tags: weighted_f1 0.4 < 0.9 - 0.005",)
    assert compare_reports({"groups": {}, "served": {"groups": {"tags": {"weighted_f1": 0.897}}}}, current).publish
    assert not compare_reports({"groups": {}}, current).publish  # serves no free tag any more


def test_a_candidate_is_judged_on_its_own_when_the_current_model_is_evaluated_in_nothing() -> None:
    current: dict[str, Any] = {"groups": {}, "served": {"groups": {}}}
    good = {"groups": {}, "served": {"groups": {"tags": {"weighted_f1": 0.4}}}}
    assert compare_reports(good, current).publish
    assert "judged on its own" in compare_reports(good, current).reasons[0]
    useless = {"groups": {}, "served": {"groups": {"tags": {"weighted_f1": 0.0}}}}
    assert not compare_reports(useless, current).publish


def test_a_group_neither_model_knows_the_labels_of_is_no_loss() -> None:
    # the current model knows none of the colours the products carry (counted 0), and the candidate dropped the
    # group (every value too rare to learn): that was "the candidate lacks it", refused at every cycle
    current = {"groups": {"gender": {"weighted_f1": 0.8}, "colour": {"weighted_f1": None, "n_unknown": 12}}}
    candidate = {"groups": {"gender": {"weighted_f1": 0.82}}}
    decision = compare_reports(candidate, current)
    assert decision.publish, decision.reasons
    assert "colour: neither model knows the labels its products carry (not compared)" in decision.reasons
    known = {"groups": {"gender": {"weighted_f1": 0.8}, "colour": {"weighted_f1": 0.5}}}
    assert not compare_reports(candidate, known).publish  # a group the current model does tag still counts


@pytest.mark.parametrize(
    ("signature", "said"),
    [
        (b"\xff\xfe garbage", "not base64 text"),  # before: UnicodeDecodeError, a traceback and exit 1
        (b"c2lnbmF0dXJl\n", "9 bytes, not 64"),  # before: announced as it was
    ],
)
def test_publish_refuses_a_manifest_signature_that_is_no_signature_in_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    signature: bytes,
    said: str,
) -> None:
    from tagstream.cli import main
    from tests.tinymodel import make_bundle

    bundle = make_bundle(tmp_path / "registry")
    (bundle / "manifest.sig").write_bytes(signature)
    monkeypatch.setenv("TAGSTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:1")  # nothing is sent: refused before Kafka
    code = main(["publish", "--model", str(bundle)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("tagstream publish: error: ") and "manifest.sig: not a base64 Ed25519 signature" in err[0]
    assert said in err[0]


def test_a_catalog_that_does_not_load_at_the_start_of_every_ends_the_command_but_later_a_cycle_only(
    tmp_path: Path,
) -> None:
    """A wrong --format made every cycle fail, every 6 h, and the command never said so but in its logs."""
    from tagstream.errors import DataError

    products = [CatalogProduct(f"p{i}", f"title {i}", category_path=("A", f"B{i % 3}")) for i in range(60)]
    loads: list[int] = []

    def load(fail_at: int) -> list[CatalogProduct]:
        loads.append(1)
        if len(loads) == fail_at:
            raise DataError("line 1: the first data row does not parse as 'jsonl'; wrong --format?")
        return products

    def run(fail_at: int) -> list[dict]:
        loads.clear()
        return periodic_retrain(
            lambda: load(fail_at), TrainerSettings(), every_s=0.0, registry=tmp_path / str(fail_at), max_cycles=2,
            publish=lambda bundle: None, train_fn=lambda ps, st, *, registry, split: registry / f"b{len(loads)}",
            evaluate_fn=lambda bundle, eval_set: {"groups": {"category_l2": {"weighted_f1": 0.5}}},
            sleep=lambda s: None,
        )  # fmt: skip

    with pytest.raises(DataError, match="wrong --format"):
        run(fail_at=1)
    later = run(fail_at=2)  # the file being rewritten, say: that cycle fails, the next one runs
    assert "wrong --format" in later[1]["error"] and len(later) == 2
