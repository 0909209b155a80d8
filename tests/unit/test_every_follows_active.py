"""`train --every`: each cycle compares with the model the workers announce active on model-updates, and the
candidates the gate refused are kept bounded (`--keep-refused`). No Kafka, no TensorFlow: fakes."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from schemas import ModelUpdate
from tagstream.errors import ConfigError, ModelRejectedError, TagstreamError
from training.catalog import CatalogProduct
from training.publish import PUBLISHED_FILE, model_update_event, periodic_retrain, record_publication
from training.settings import TrainerSettings

PRODUCTS = [CatalogProduct(f"p{i}", f"title {i}", category_path=("A", f"B{i % 3}")) for i in range(60)]


def _now() -> int:
    return time.time_ns() // 1_000_000


def _request(kind: str, version: str) -> ModelUpdate:
    return ModelUpdate(kind=kind, model_version=version, emitted_at=_now())  # type: ignore[arg-type]


def _activated(bundle: Path, worker: str = "w-1", sha256: str | None = None) -> ModelUpdate:
    """The answer a worker sends when `bundle` became its active model (activate, promote, rollback, its start)."""
    event, _ = model_update_event(bundle)
    return ModelUpdate(
        kind="model-activated",
        model_version=event.model_version,
        emitted_at=_now(),
        bundle_uri=event.bundle_uri,
        sha256=sha256 or event.sha256,
        worker_id=worker,
    )


def _registry(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(registry, a, b): two valid bundles, b recorded as the trainer's last publication (`published.jsonl`)."""
    from tests.models import featurized_bundle

    registry = tmp_path / "registry"
    a, b = sorted([featurized_bundle(registry, seed=0), featurized_bundle(registry, seed=1)])
    record_publication(b, model_update_event(b)[0])
    return registry, a, b


def _evaluate(quality: dict[str, float]) -> Callable[[Path, Any], dict[str, Any]]:
    def evaluate_fn(bundle: Path, eval_set: Any) -> dict[str, Any]:
        if bundle.name not in quality:
            raise ModelRejectedError([f"{bundle}: not a bundle directory"])
        return {"groups": {"category_l1": {"weighted_f1": quality[bundle.name]}}}

    return evaluate_fn


def _fake_train(made: list[Path]) -> Callable[..., Path]:
    """Candidates c0, c1, … written into the registry as directories."""

    def train_fn(products: Any, settings: Any, *, registry: Path, split: Any) -> Path:
        bundle = registry / f"c{len(made)}"
        bundle.mkdir(parents=True)
        (bundle / "model.onnx").write_bytes(b"x")
        made.append(bundle)
        return bundle

    return train_fn


class FakeKafka:
    """model-updates for `periodic_retrain`'s defaults: `publish_bundle` records the publication in published.jsonl
    and appends its request (no worker answers it), `read_model_updates` returns the events (raises when `down`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import training.publish

        self.events: list[ModelUpdate] = []
        self.sent: list[Path] = []
        self.down = False
        monkeypatch.setattr(training.publish, "publish_bundle", self.publish_bundle)
        monkeypatch.setattr(training.publish, "read_model_updates", self.read, raising=False)

    def publish_bundle(self, bundle: Path, kind: str, settings: TrainerSettings) -> None:
        with (bundle.parent / PUBLISHED_FILE).open("a") as fh:
            fh.write(f'{{"model_version": "{bundle.name}", "kind": "{kind}"}}\n')
        self.sent.append(bundle)
        self.events.append(_request("activate", bundle.name))

    def read(self, settings: TrainerSettings) -> list[ModelUpdate]:
        if self.down:
            raise TagstreamError("could not read model-updates at 127.0.0.1:9092: Unable to bootstrap")
        return list(self.events)


@pytest.fixture
def kafka(monkeypatch: pytest.MonkeyPatch) -> FakeKafka:
    return FakeKafka(monkeypatch)


def _retrain(registry: Path, quality: dict[str, float], cycles: int, **kw: Any) -> tuple[list[dict], list[Path]]:
    """`periodic_retrain` as the CLI calls it (real `publish` and model-updates: `FakeKafka`), fake training
    (candidates c0, c1, … in the registry) and evaluation (`quality` by bundle name)."""
    made: list[Path] = []
    records = periodic_retrain(
        lambda: PRODUCTS,
        TrainerSettings(),
        every_s=0.0,
        registry=registry,
        max_cycles=cycles,
        train_fn=_fake_train(made),
        evaluate_fn=_evaluate(quality),
        sleep=lambda s: None,
        **kw,
    )
    return records, made


# ---------------------------------------------------------------- the model compared with is the workers' one


def test_after_a_rollback_the_next_candidate_is_compared_with_the_model_the_workers_run(
    tmp_path: Path, kafka: FakeKafka, caplog: pytest.LogCaptureFixture
) -> None:
    registry, a, b = _registry(tmp_path)
    # the trainer published b, the workers activated it, then an operator rolled them back to a
    kafka.events += [_request("activate", b.name), _activated(b), _request("rollback", "previous"), _activated(a)]
    with caplog.at_level(logging.INFO, logger="training.publish"):
        records, made = _retrain(registry, {a.name: 0.5, b.name: 0.9, "c0": 0.7, "c1": 0.6}, 2)
    # before: c0 was compared with b (0.9), the model the workers no longer run, and refused
    assert records[0]["current"] == str(a) and records[0]["current_from"] == "model-updates", records[0]
    assert records[0]["publish"] is True and kafka.sent == [made[0]]
    assert f"the workers run {a.name} (model-activated by w-1), not {b.name}" in caplog.text
    # no worker answered c0 yet (they are stopped): the newest answer (a) does not tell what they will run
    assert records[1]["current"] == str(made[0]) and records[1]["current_from"] == "published by this run"
    assert records[1]["publish"] is False and kafka.sent == [made[0]]
    assert "no worker has answered on model-updates since c0 was published there" in caplog.text


@pytest.mark.parametrize(
    ("case", "said"),
    [
        ("unreadable", "which model the workers run is not known (could not read model-updates at 127.0.0.1:9092"),
        ("empty", "which model the workers run is not known (model-updates holds no answer from a worker)"),
        ("refusals only", "(the workers' answers on model-updates are all refusals)"),
        ("not in the registry", "the workers run 20990101T000000Z-0badbeef (model-activated by w-9), not a bundle of"),
        ("another bundle", "but {path} is another bundle (sha256"),
    ],
)
def test_when_the_workers_model_is_not_known_here_the_trainers_own_model_is_compared_with_and_it_is_said(
    tmp_path: Path, kafka: FakeKafka, caplog: pytest.LogCaptureFixture, case: str, said: str
) -> None:
    registry, a, b = _registry(tmp_path)
    other = ModelUpdate(
        kind="model-activated", model_version="20990101T000000Z-0badbeef", emitted_at=_now(), worker_id="w-9"
    )
    rejected = ModelUpdate(kind="model-rejected", model_version=a.name, emitted_at=_now(), reasons=("canary",))
    kafka.down = case == "unreadable"
    kafka.events += {
        "unreadable": [],
        "empty": [],
        "refusals only": [rejected],
        "not in the registry": [other],
        "another bundle": [_activated(a, sha256="0" * 64)],
    }[case]
    with caplog.at_level(logging.INFO, logger="training.publish"):
        [record], _ = _retrain(registry, {a.name: 0.9, b.name: 0.5, "c0": 0.6}, 1)
    assert record["current"] == str(b) and record["current_from"] == PUBLISHED_FILE and record["publish"] is True
    # before: nothing said which model was compared with and why
    assert said.format(path=a) in caplog.text
    assert f"comparing with {b.name}, the trainer's own current model" in caplog.text


# ---------------------------------------------------------------- refused candidates are kept bounded


def test_refused_candidates_beyond_the_newest_3_are_removed_never_a_published_or_named_one(
    tmp_path: Path, kafka: FakeKafka, caplog: pytest.LogCaptureFixture
) -> None:
    registry = tmp_path / "registry"
    (registry / "20200101T000000Z-0000beef").mkdir(parents=True)  # not made by this run: never touched
    kafka.events.append(_request("shadow", "c2"))  # an operator shadows the refused c2: in use, kept
    quality = {"c0": 0.9, **{f"c{i}": 0.5 for i in range(1, 7)}}
    with caplog.at_level(logging.INFO, logger="training.publish"):
        records, made = _retrain(registry, quality, 7)
    assert [r["publish"] for r in records] == [True] + [False] * 6
    # before: every refused candidate stayed (~70-100 MB each)
    assert [r["removed"] for r in records] == [[], [], [], [], [], [str(made[1])], [str(made[3])]]
    left = sorted(p.name for p in registry.iterdir())
    assert left == ["20200101T000000Z-0000beef", "c0", "c2", "c4", "c5", "c6", PUBLISHED_FILE]
    assert f"removed {made[1]}, a candidate the gate refused (the newest 3 refused are kept)" in caplog.text


def test_keep_refused_0_removes_each_refused_candidate_after_its_report_and_keeps_the_current_model(
    tmp_path: Path, kafka: FakeKafka
) -> None:
    registry = tmp_path / "registry"
    seen: list[tuple[str, bool]] = []

    def on_decision(record: dict[str, Any]) -> None:  # the CLI writes the cycle's report from the bundle here
        seen.append((Path(record["bundle"]).name, Path(record["bundle"]).is_dir()))

    quality = {"c0": 0.9, "c1": 0.5, "c2": 0.95, "c3": 0.5}
    records, made = _retrain(registry, quality, 4, keep_refused=0, on_decision=on_decision)
    assert [r["removed"] for r in records] == [[], [str(made[1])], [], [str(made[3])]]
    assert seen == [("c0", True), ("c1", True), ("c2", True), ("c3", True)]
    assert sorted(p.name for p in registry.iterdir()) == ["c0", "c2", PUBLISHED_FILE]
    assert not list(registry.glob(".tmp-*"))


def test_a_removal_that_fails_is_a_warning_and_is_tried_again(
    tmp_path: Path, kafka: FakeKafka, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    registry = tmp_path / "registry"
    rename, calls = os.rename, []

    def rename_refused_once(src: Any, dst: Any) -> None:
        calls.append(src)
        if len(calls) == 1:
            raise PermissionError(13, "Permission denied", str(src))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_refused_once)
    with caplog.at_level(logging.WARNING, logger="training.publish"):
        records, made = _retrain(registry, {"c0": 0.9, "c1": 0.5, "c2": 0.5}, 3, keep_refused=0)
    assert [r["removed"] for r in records] == [[], [], [str(made[1]), str(made[2])]]
    assert "error" not in records[1]
    assert f"could not remove the refused candidate {made[1]}: [Errno 13] Permission denied" in caplog.text


def test_nothing_is_removed_in_a_cycle_that_cannot_read_model_updates(
    tmp_path: Path, kafka: FakeKafka, caplog: pytest.LogCaptureFixture
) -> None:
    kafka.down = True
    with caplog.at_level(logging.INFO, logger="training.publish"):
        records, made = _retrain(tmp_path / "registry", {"c0": 0.9, "c1": 0.5}, 2, keep_refused=0)
    assert records[1]["removed"] == [] and made[1].is_dir()  # an operator may run it: that is not known
    assert "no refused candidate removed after this cycle: model-updates was not read" in caplog.text


def test_a_negative_keep_refused_is_one_error_line_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tagstream.cli import main

    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text('{"product_id": "p1", "title": "t"}\n')
    base = ["train", "--catalog", str(catalog), "--format", "jsonl", "--out", str(tmp_path / "models")]
    for extra, expected in [
        (["--every", "1h", "--keep-refused", "-1"], "--keep-refused must be 0 or more (the refused candidates kept)"),
        (["--keep-refused", "2"], "--keep-refused goes with --every"),
        (["--kind", "shadow"], "--kind goes with --every"),  # was silently ignored: nothing published
    ]:
        code = main([*base, *extra, "--cycles", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("tagstream train: error: ") and expected in err[-1], err
    with pytest.raises(ConfigError, match="--keep-refused must be 0 or more"):
        periodic_retrain(lambda: PRODUCTS, TrainerSettings(), every_s=1.0, registry=tmp_path, keep_refused=-1)
