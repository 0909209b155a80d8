"""tagstream benchmarks.

- `tagstream bench` (orchestrated by `tagstream/bench.py`): transport ceiling (raw aiokafka passthrough), tagstream
  end to end (a real `tagstream worker` subprocess: throughput on a pre-loaded backlog, event-to-tag latency at half
  that rate, peak RSS, TensorFlow absent), a naive per-event implementation (Keras + per-event Redis round trips),
  ONNX Runtime vs Keras scoring, and featurizer cost per title. Figures are reported, never asserted.
- `bench/quality.py`: model quality on the real catalogs (another engineer's file).

The helper scripts here run as their own processes (`python -m bench.<name>`), so the orchestrator never imports
TensorFlow and each side of a comparison gets its own interpreter.
"""
