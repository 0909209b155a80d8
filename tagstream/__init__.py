"""tagstream: a streaming, real-time product tag updater (Kafka in, Redis state, ONNX scoring, tag updates out)."""

from tagstream.errors import TagstreamError

__all__ = ["TagstreamError", "__version__"]

__version__ = "0.1.0"
