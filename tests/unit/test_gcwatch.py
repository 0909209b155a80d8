"""The worker's garbage-collector thresholds and its record of collection pauses."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from streams.gcwatch import GcPauses, last_summary
from streams.settings import WorkerSettings


@pytest.fixture
def pauses() -> Iterator[GcPauses]:
    watch = GcPauses((12_345, 11, 12))
    yield watch
    watch.uninstall()


def test_install_sets_thresholds_and_uninstall_restores_them(pauses: GcPauses) -> None:
    before = gc.get_threshold()
    pauses.install()
    assert gc.get_threshold() == (12_345, 11, 12)
    pauses.install()  # a second install keeps the thresholds it replaced
    pauses.uninstall()
    assert gc.get_threshold() == before
    assert pauses._observe not in gc.callbacks


def test_full_collections_are_counted_with_their_pause(pauses: GcPauses) -> None:
    pauses.install()
    garbage = []
    for _ in range(2_000):  # cycles only the collector frees
        node: list[object] = []
        node.append(node)
        garbage.append(node)
    del garbage, node
    gc.collect()
    gc.collect(0)
    assert pauses.runs[2] >= 1 and pauses.runs[0] >= 1
    assert 0 < pauses.longest_ms[2] <= pauses.total_ms[2]
    assert "full collections" in pauses.summary() and "(12345, 11, 12)" in pauses.summary()
    pauses.uninstall()
    runs = list(pauses.runs)
    gc.collect()
    assert pauses.runs == runs  # no longer counting
    # what a benchmark reads back from the worker's log: the last summary line's figures
    logged = last_summary("earlier line\n" + pauses.summary() + "\nlater line")
    assert logged is not None
    assert (logged["full"], logged["young"]) == (pauses.runs[2], pauses.runs[0] + pauses.runs[1])
    assert last_summary("no collector line") is None


def test_settings_take_thresholds_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings().gc_thresholds == (10_000, 10, 10)
    monkeypatch.setenv("TAGSTREAM_GC_THRESHOLDS", "[700, 10, 10]")
    assert WorkerSettings().gc_thresholds == (700, 10, 10)
    monkeypatch.setenv("TAGSTREAM_GC_THRESHOLDS", "[0, 10, 10]")
    with pytest.raises(ValidationError, match="at least 1"):
        WorkerSettings()
