"""`train --every`: the fixed evaluation set, the not-worse gate and a failing cycle (no TensorFlow: fakes)."""

from __future__ import annotations

import logging
from pathlib import Path

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


def test_a_cycle_that_fails_with_an_os_error_is_logged_and_the_loop_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    products = [CatalogProduct(f"p{i}", f"title {i}", category_path=("A", f"B{i % 3}")) for i in range(60)]
    calls: list[int] = []

    def train_fn(products, settings, *, registry, split) -> Path:
        calls.append(1)
        if len(calls) == 1:
            raise FileNotFoundError(2, "No such file or directory", "/nonexistent")
        return tmp_path / f"b{len(calls)}"

    published: list[Path] = []
    with caplog.at_level(logging.ERROR, logger="training.publish"):
        records = periodic_retrain(
            lambda: products,
            TrainerSettings(),
            every_s=0.0,
            registry=tmp_path,
            max_cycles=2,
            publish=published.append,
            train_fn=train_fn,
            evaluate_fn=lambda bundle, eval_set: {"groups": {"category_l2": {"weighted_f1": 0.5}}},
            sleep=lambda s: None,
        )
    assert "/nonexistent" in records[0]["error"] and records[0]["publish"] is False
    assert records[1]["publish"] is True and published == [tmp_path / "b2"]
    assert "retrain cycle 1 failed" in caplog.text
