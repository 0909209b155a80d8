"""The serving path: bundles, ONNX scoring, tag decoding, behaviour tags, HTTP lookup (no TensorFlow).

Names are imported lazily so that `import serving.featurizer` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ModelBundle", "OnnxScorer", "TagDecoder", "load_bundle", "write_bundle"]

_WHERE = {
    "ModelBundle": "serving.bundle",
    "load_bundle": "serving.bundle",
    "write_bundle": "serving.bundle",
    "OnnxScorer": "serving.scorer",
    "TagDecoder": "serving.decoding",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
