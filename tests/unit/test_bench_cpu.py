"""The bench's CPU accounting: CPU seconds between two times from cumulative samples."""

from __future__ import annotations

from bench.common import cpu_between


def test_cpu_between_two_times_spans_the_samples_around_them() -> None:
    samples = [(0.0, 1.0), (0.2, 1.1), (0.4, 1.3), (0.6, 1.6)]
    assert cpu_between(samples, 0.2, 0.6) == 1.6 - 1.1
    assert cpu_between(samples, 0.3, 0.5) == 1.6 - 1.1  # widened to the samples around the span, never narrowed
    assert cpu_between(samples, 0.0, 0.7) is None and cpu_between([], 0.0, 0.1) is None  # no sample after its end
