"""The one exception hierarchy of tagstream: every error the project raises on purpose derives from TagstreamError."""

from __future__ import annotations

__all__ = [
    "BaselineProcessError",
    "BundleError",
    "ConfigError",
    "DataError",
    "DeliveryError",
    "EventDecodeError",
    "EventKeyError",
    "EventTimeError",
    "ExportError",
    "FeaturizerError",
    "ModelLoadError",
    "ModelNotLoadedError",
    "ModelRejectedError",
    "OutputTooLargeError",
    "ParityError",
    "SchemaValidationError",
    "ScoringError",
    "StackError",
    "StateConflictError",
    "StateError",
    "StateLostError",
    "StoreMismatchError",
    "TagstreamError",
    "TopicsRecreatedError",
    "ValidationTimeoutError",
]


class TagstreamError(Exception):
    """Base class of every error tagstream raises on purpose."""


class ConfigError(TagstreamError):
    """Settings or command-line arguments are invalid or inconsistent."""


class StackError(TagstreamError):
    """The local Kafka/Redis stack cannot be installed, started, checked or stopped."""


class EventDecodeError(TagstreamError):
    """An event's bytes are not UTF-8 JSON of an object."""


class SchemaValidationError(EventDecodeError):
    """An event decodes but does not satisfy its topic's JSON Schema."""


class EventTimeError(EventDecodeError):
    """An event's time lies further ahead of the worker's clock than `TAGSTREAM_MAX_EVENT_AHEAD_MS` allows."""


class EventKeyError(EventDecodeError):
    """An event's Kafka key is not its product id, so its product's events would not all reach one partition."""


class OutputTooLargeError(TagstreamError):
    """An event's tag update would be larger than the tag-updates topic takes."""


class DeliveryError(TagstreamError):
    """Kafka refused a record the worker produced: its batch stays unacknowledged and the worker stops."""


class StateError(TagstreamError):
    """Redis state could not be read or written (after bounded retries)."""


class StateLostError(StateError):
    """Redis holds no state while the worker's consumer group has committed offsets: the state was lost."""


class TopicsRecreatedError(StateError):
    """Redis holds state applied from input offsets Kafka's topics have not reached: the topics were made again."""


class StoreMismatchError(StateError):
    """The worker's consumer group has committed offsets for another Redis store: the group's state is split."""


class StateConflictError(StateError):
    """Another writer changed a product between a batch's read of its state and the batch's write."""


class DataError(TagstreamError):
    """Training input cannot be read: names the file, line and reason."""


class FeaturizerError(TagstreamError):
    """A featurizer spec is invalid or does not match the inputs."""


class BundleError(TagstreamError):
    """A model bundle is missing files, has bad checksums or an invalid manifest."""


class ModelRejectedError(BundleError):
    """A bundle failed validation before a swap; carries the list of reasons."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = list(reasons)


class ValidationTimeoutError(ModelRejectedError):
    """A bundle's validation in its child process did not finish within its time limit."""


class ModelLoadError(TagstreamError):
    """An ONNX session could not be created from a bundle."""


class ModelNotLoadedError(TagstreamError):
    """Scoring was attempted on a scorer with no loaded model."""


class ScoringError(TagstreamError):
    """ONNX Runtime failed or returned invalid (NaN, inf, wrong shape) scores."""


class ExportError(TagstreamError):
    """A trained Keras model could not be exported to ONNX."""


class ParityError(ExportError):
    """The exported ONNX model's outputs differ from Keras beyond tolerance or flip decisions."""


class BaselineProcessError(TagstreamError):
    """The same-run baseline's process ended without an answer (killed, out of memory, cancelled)."""
