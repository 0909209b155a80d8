"""Synthetic catalog + behaviour: determinism, tree consistency, event mix; real click-log loading and mapping."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tagstream.errors import DataError
from tagstream.synth import (
    CATEGORY_TREE,
    Burst,
    generate_behaviour,
    generate_catalog,
    load_click_log,
    map_clicks_to_catalog,
    write_jsonl,
)
from training.loaders import load_catalog

SCHEMA = Path(__file__).parents[2] / "schemas" / "click.v1.json"


def test_catalog_is_deterministic_and_consistent_with_the_tree() -> None:
    a, b = generate_catalog(400, seed=7), generate_catalog(400, seed=7)
    assert a == b
    assert a != generate_catalog(400, seed=8)
    assert len({p.product_id for p in a}) == 400
    leaves = Counter()
    for p in a:
        l1, l2, leaf = p.category_path
        assert leaf in CATEGORY_TREE[l1][l2]
        leaves[p.category_path] += 1
        assert p.title.strip() and p.currency == "CNY"
        if l1 == "Apparel":
            assert p.attributes.get("gender") in {"Men", "Women", "Unisex"}
        if l1 == "Grocery":
            assert "colour" not in p.attributes
    n_leaves = sum(
        len([k for k in l2 if not k.startswith("_")])
        for l1 in CATEGORY_TREE.values()
        for name, l2 in l1.items()
        if not name.startswith("_")
    )
    assert 20 <= n_leaves == len(leaves)  # every leaf appears
    assert len({p.category_path[0] for p in a}) == 4
    text = " ".join(p.title for p in a)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text) and any(ch.isascii() and ch.isalpha() for ch in text)


def test_catalog_round_trips_through_jsonl(tmp_path: Path) -> None:
    prods = generate_catalog(50, seed=1)
    assert write_jsonl(prods, tmp_path / "c.jsonl") == 50
    res = load_catalog(tmp_path / "c.jsonl", "jsonl", dedupe=False)
    assert [p.product_id for p in res.products] == [p.product_id for p in prods]
    assert [p.category_path for p in res.products] == [p.category_path for p in prods]


def test_behaviour_mix_sessions_bursts_and_schema() -> None:
    import jsonschema

    prods = generate_catalog(200, seed=2)
    start = 1_764_000_000_000
    burst = Burst(prods[10].product_id, start + 1_800_000, 600_000, 300)
    ev = generate_behaviour(prods, 5000, start, seed=3, bursts=[burst])
    assert ev == generate_behaviour(prods, 5000, start, seed=3, bursts=[burst])
    assert len(ev) == 5300
    assert [e["ts"] for e in ev] == sorted(e["ts"] for e in ev)
    mix = Counter(e["event_type"] for e in ev if not e["user_id"].startswith("bu-"))
    assert mix["view"] > 3 * mix["click"] > 0 and mix["click"] > mix["add_to_cart"] > mix["purchase"] > 0
    pop = Counter(e["product_id"] for e in ev if not e["user_id"].startswith("bu-")).most_common()
    assert pop[0][1] > 10 * pop[len(pop) // 2][1]  # Zipf skew
    assert len({e["session_id"] for e in ev}) > 100
    in_burst = [e for e in ev if burst.start_ms <= e["ts"] < burst.start_ms + burst.duration_ms]
    assert Counter(e["product_id"] for e in in_burst).most_common(1)[0][0] == burst.product_id
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    for e in ev[:200]:
        validator.validate(e)


def test_load_click_logs_and_map_to_catalog(tmp_path: Path) -> None:
    tb = tmp_path / "UserBehavior.csv"
    tb.write_text(
        "1,100,9,pv,1511544070\n1,100,9,cart,1511544080\n1,200,9,pv,1511550000\n2,100,9,buy,1511544090\n"
        "2,300,9,fav,1511544095\n3,100,9,pv,notatime\n"
    )
    log = load_click_log(tb, "taobao")
    assert log.rows_read == 6 and len(log.events) == 5 and sum(log.skipped.values()) == 1
    assert log.event_mix() == {"view": 2, "add_to_cart": 1, "purchase": 1, "click": 1}
    sessions = {e["session_id"] for e in log.events if e["user_id"] == "tb-1"}
    assert len(sessions) == 2  # > 30 min gap
    assert log.events[0]["ts"] == 1511544070000

    yc = tmp_path / "yc.txt"
    yc.write_text("SessionId\tItemId\tTime\n1\t214536502\t1396860669.277\n1\t214536506\t1396860886.998\n")
    ylog = load_click_log(yc, "yoochoose")
    assert [e["ts"] for e in ylog.events] == [1396860669277, 1396860886998]
    assert ylog.events[0]["session_id"] == "yc-1"

    dg = tmp_path / "dg.csv"
    dg.write_text(
        "session_id;user_id;item_id;timeframe;eventdate\n1;NA;81766;526309;2016-05-09\n1;5;31331;1031018;2016-05-09\n"
    )
    dlog = load_click_log(dg, "diginetica")
    assert dlog.events[0]["ts"] == 1462752000000 + 526309 and dlog.events[1]["user_id"] == "dg-u5"

    prods = generate_catalog(10, seed=0)
    mapped = map_clicks_to_catalog(log, prods, seed=1)
    assert [e["ts"] for e in mapped] == [e["ts"] for e in log.events]
    assert [e["event_type"] for e in mapped] == [e["event_type"] for e in log.events]
    ids = {p.product_id for p in prods}
    assert all(e["product_id"] in ids and e["schema_version"] == 1 for e in mapped)
    top_item = [e for e, m in zip(log.events, mapped, strict=True) if e["item_id"] == "100"]
    assert len({m["product_id"] for e, m in zip(log.events, mapped, strict=True) if e["item_id"] == "100"}) == 1
    assert len(top_item) == 3
    shifted = map_clicks_to_catalog(log, prods, seed=1, start_ms=0)
    assert shifted[0]["ts"] == 0


def test_click_log_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing.csv: cannot open") as whole:
        load_click_log(tmp_path / "missing.csv", "taobao")
    assert "line 0" not in str(whole.value)  # an error of the whole file names no line
    yc = tmp_path / "yc.txt"
    yc.write_text("SessionId\tItemId\tTime\n1\t2\t3\n")
    with pytest.raises(DataError, match=r"line 1: header"):
        load_click_log(yc, "diginetica")
    with pytest.raises(DataError, match=r"yc.txt: line 1: .*not a taobao"):
        load_click_log(yc, "taobao")
    with pytest.raises(DataError, match="unknown click log format"):
        load_click_log(yc, "nope")
