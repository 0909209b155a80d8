"""Record ages at batch start: what part of event→tag latency is spent before the worker."""

from __future__ import annotations

from pathlib import Path

import orjson

from streams.app import Worker
from streams.arrival import MAX_MS, ArrivalAges, last_summary
from streams.processor import InMessage, now_ms
from streams.settings import WorkerSettings
from streams.state import MemoryStateStore
from tests.events import behaviour
from tests.models import featurized_bundle


def test_percentiles_are_the_ages_of_the_counted_records() -> None:
    ages = ArrivalAges()
    ages.count("behavior", 10_000, [10_000 - a for a in range(1, 101)])  # ages 1..100 ms
    ages.count("products", 10_000, [9_990, 9_980])
    assert ages.percentile("behavior", 50) == 50
    assert ages.percentile("behavior", 99) == 99
    assert ages.percentile("products", 50) == 10
    assert ages.percentile("products", 99) == 20
    assert ages.counted("behavior") == 100
    assert ages.percentile("unknown", 50) is None


def test_records_without_a_timestamp_are_skipped_and_odd_ones_clamped() -> None:
    ages = ArrivalAges()
    ages.count("products", 50_000, [0, 0])
    assert ages.counted("products") == 0 and ages.percentile("products", 50) is None
    ages.count("products", 50_000, [50_020])  # a producer clock 20 ms ahead: age 0, not negative
    ages.count("products", 50_000, [1])  # older than the histogram: its last bin
    assert ages.percentile("products", 1) == 0
    assert ages.percentile("products", 100) == MAX_MS


def test_the_logged_line_reads_back() -> None:
    ages = ArrivalAges()
    assert last_summary(ages.summary()) == {}
    assert last_summary("no such line") is None
    ages.count("products", 1_000, [990, 980, 970])
    ages.count("behavior", 1_000, [999])
    logged = last_summary("earlier\n" + ArrivalAges().summary() + "\n" + ages.summary() + "\nlater")
    assert logged == {
        "behavior": {"p50": 1, "p99": 1, "n": 1},
        "products": {"p50": 20, "p99": 30, "n": 3},
    }


async def test_the_worker_counts_every_record_of_a_batch_under_its_topic_name(tmp_path: Path) -> None:
    settings = WorkerSettings(topic_prefix="ages-", app_id="ages", model_path=featurized_bundle(tmp_path / "reg"))
    worker = Worker(settings, store_factory=lambda: MemoryStateStore("a"), capture_output=True)
    processor = await worker.processor()
    sent = now_ms() - 2_000  # produced two seconds ago: the batch starts at least that late
    messages = [
        InMessage("ages-behavior", 0, i, b"p1", orjson.dumps(behaviour("p1", f"u{i}", sent)), timestamp_ms=sent)
        for i in range(3)
    ]
    await worker._process_batch(messages, processor.process_behaviour, processor.prepare_behaviour)
    ages = worker.stats.arrival
    assert ages.counted("behavior") == 3 and ages.counted("ages-behavior") == 0
    assert 2_000 <= ages.percentile("behavior", 50) < 60_000  # type: ignore[operator]
    assert "behavior p50 " in ages.summary()
