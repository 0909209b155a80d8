"""The worker's garbage-collector settings and a record of its pauses.

A collection runs on the event loop's thread with the GIL held, so each one stalls every batch in flight. With
CPython's default thresholds (700, 10, 10) a worker at 6,000 events/s ran ~60 young collections a second (~1 % of a
core) and a full one about every second, each walking the kept product states for up to 46 ms: a stall that lands in
the latency tail. Most of what a batch allocates is freed by reference counting anyway (decoded events, op lists,
tag dicts); a young generation of 10,000 containers lets that happen before a collection looks at it, and full
collections become rare (bench/RESULTS.md, twelfth session).
"""

from __future__ import annotations

import gc
import re
import time
from typing import Any

__all__ = ["GcPauses", "last_summary"]


class GcPauses:
    """Sets the collector's thresholds while installed and counts its runs and pauses per generation."""

    def __init__(self, thresholds: tuple[int, int, int]) -> None:
        self.thresholds = thresholds
        self.runs = [0, 0, 0]
        self.total_ms = [0.0, 0.0, 0.0]
        self.longest_ms = [0.0, 0.0, 0.0]
        self._started: float | None = None
        self._previous: tuple[int, int, int] | None = None

    @property
    def installed(self) -> bool:
        """Whether the thresholds are set and pauses are being counted."""
        return self._previous is not None

    def install(self) -> None:
        """Set the thresholds and start counting (idempotent)."""
        if self._previous is not None:
            return
        self._previous = gc.get_threshold()
        gc.set_threshold(*self.thresholds)
        gc.callbacks.append(self._observe)

    def uninstall(self) -> None:
        """Restore the previous thresholds and stop counting."""
        if self._previous is None:
            return
        gc.set_threshold(*self._previous)
        self._previous = None
        if self._observe in gc.callbacks:
            gc.callbacks.remove(self._observe)

    def _observe(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:
            return
        pause_ms = (time.perf_counter() - self._started) * 1000
        self._started = None
        generation = info["generation"]
        self.runs[generation] += 1
        self.total_ms[generation] += pause_ms
        self.longest_ms[generation] = max(self.longest_ms[generation], pause_ms)

    def summary(self) -> str:
        """One line for the stats log (`last_summary` reads it back)."""
        return (
            f"gc: {self.runs[2]} full collections (longest {self.longest_ms[2]:.1f} ms), "
            f"{self.runs[0] + self.runs[1]} young ones ({self.total_ms[0] + self.total_ms[1]:.0f} ms in all); "
            f"thresholds {self.thresholds}"
        )


_SUMMARY = re.compile(r"gc: (\d+) full collections \(longest ([\d.]+) ms\), (\d+) young ones \(([\d.]+) ms in all\)")


def last_summary(log_text: str) -> dict[str, int | float] | None:
    """The figures of the last `GcPauses.summary` line in a worker's log (None if it logged none)."""
    found = _SUMMARY.findall(log_text)
    if not found:
        return None
    full, longest, young, young_ms = found[-1]
    return {"full": int(full), "longest_full_ms": float(longest), "young": int(young), "young_ms": float(young_ms)}
