"""Settings of the offline trainer (env prefix `TAGSTREAM_`, e.g. `TAGSTREAM_EPOCHS=12`); no TensorFlow here."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving.featurizer import FeaturizerConfig
from tagstream.errors import BundleError, ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["TrainerSettings", "enclosing_bundle", "load_trainer_settings", "writable_dir"]


class TrainerSettings(BaseSettings):
    """Everything `tagstream train` reads from its environment (command-line flags override these)."""

    model_config = SettingsConfigDict(env_prefix="TAGSTREAM_", extra="ignore")

    # where things go
    model_registry: Path = Field(Path("models"), description="Registry directory the bundles are written into.")
    model_name: str = Field("tagstream-tagger", description="model_name in the manifest (and model-update key).")
    signing_key_path: Path | None = Field(None, description="Ed25519 private key (PEM or raw) to sign manifests.")
    model_verify_key: SecretStr | None = Field(
        None, description="Base64 Ed25519 public key (as the workers'): when set, publish refuses unverified bundles."
    )
    # featurizer
    hash_bits: int = Field(
        18,
        ge=8,
        le=24,
        description="Hash buckets = 2**hash_bits (embedding rows). The JD titles have ~294k n-grams and words in two "
        "or more products: 2**17 buckets held ~2.3 each. JD merchants held out, leaf w-F1: 17 → 18 → 19 bits "
        "0.8203 → 0.8208 → 0.8214 (refit 3, int8); 18 bits as int8 take the memory 17 bits took as float16.",
    )
    max_features: int = Field(
        128,
        ge=8,
        le=1024,
        description="L: features kept per product (highest TF-IDF). JD titles average ~108: 128 scores like 192, "
        "trains a third faster and scores cheaper.",
    )
    char_ngram_min: int = Field(1, ge=1, le=8, description="Shortest character n-gram.")
    char_ngram_max: int = Field(3, ge=1, le=8, description="Longest character n-gram.")
    min_df: int = Field(2, ge=1, description="Buckets in fewer training products get IDF 0 (dropped).")
    word_bigrams: Literal["none", "letters", "all"] = Field(
        "letters",
        description="Pairs of adjacent title words hashed besides character n-grams and words: none, only pairs of "
        'two words that start with a letter ("navy blue"), or all (also "mate 60", "12gb 512gb": mostly one '
        "shop's model naming). With 4 refit epochs, JD merchants held out / Myntra colour / usage: none 0.8251 / "
        "0.812 / 0.619, letters 0.8247 / 0.820 / 0.646, all 0.8235 / 0.824 / 0.645 (baseline 0.8227).",
    )
    known_features: bool = Field(
        True,
        description="Keep only n-grams/words (64-bit hashes) in ≥ min_df training products; the others are dropped "
        "instead of adding noise on a bucket a known feature trained (bundle asset known.npy). JD merchants held "
        "out: leaf w-F1 0.8208 → 0.8212, fit 143 → 111 s (fewer embedding rows updated per batch).",
    )
    # labels
    min_support: int = Field(
        1,
        ge=1,
        description="Labels with fewer products are dropped (products unlabelled). 1 keeps every label: a label the "
        "model cannot output counts as a miss in evaluation, and on Myntra keeping the rare ones raised articleType "
        "macro F1 from 0.791 (at 5) to 0.875 (bench/quality.py, twenty-second session).",
    )
    # model
    embed_dim: int = Field(256, ge=8, description="Width of the TF-IDF-weighted embedding bag.")
    embed_init_scale: float = Field(1e-3, ge=0, description="Uniform ±scale init of the embedding rows.")
    sparse_lr_multiplier: float = Field(
        6.0,
        gt=0,
        description="Learning-rate factor of the embedding (sparse) rows. With learning_rate 3e-3: 0.018 for the rows "
        "(JD merchants held out, leaf w-F1 0.812 at 2e-3 × 4 → 0.817; Myntra articleType macro F1 +0.01).",
    )
    sparse_weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay of touched embedding rows.")
    hidden: tuple[Annotated[int, Field(ge=1)], ...] = Field(
        (512,), description="Widths of the hidden Dense+ReLU layers."
    )
    dropout: float = Field(0.25, ge=0, lt=1, description="Dropout before each Dense layer and the heads.")
    input_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the feature weights (feature dropout).")
    l2: float = Field(0.0, ge=0, description="L2 penalty on Dense kernels.")
    label_smoothing: float = Field(0.05, ge=0, lt=1, description="Label smoothing of exclusive heads.")
    class_weight_power: float = Field(0.3, ge=0, le=1, description="Class weight (count/mean)^-power, 0 = off.")
    ensemble: int = Field(1, ge=1, le=8, description="Members (different seeds) averaged inside one graph.")
    linear_dim: int = Field(
        128,
        ge=0,
        description="Width of an extra linear member (bag columns of member 0 -> flat heads, its own loss), 0 = off.",
    )
    combine: Literal["probs", "logits"] = Field(
        "logits", description="Members averaged as probabilities, or their logits summed before the activation."
    )
    hierarchical: bool = Field(True, description="Condition each category head on its parent head's output.")
    learning_rate: float = Field(3e-3, gt=0, description="Adam learning rate (cosine-decayed over `epochs`).")
    epochs: int = Field(
        5, ge=1, description="Most epochs (early stopping, see `monitor`), not counting the `refit_epochs`."
    )
    patience: int = Field(2, ge=0, description="Epochs without validation improvement before stopping.")
    monitor: Literal["val_loss", "val_f1"] = Field(
        "val_f1", description="Early stopping / best-epoch selection: validation loss or mean weighted F1."
    )
    refit_epochs: int = Field(
        4,
        ge=0,
        le=6,
        description="After the best epoch is picked and the thresholds are tuned on validation, train this many more "
        "epochs on train + validation (the thresholds are kept), so the shipped model has seen all labelled data "
        "like the baseline, 0 = off. JD leaf w-F1 (75/5/20; merchants held out): 0.841 / 0.806 → 0.846 / 0.812 "
        "(2 epochs); merchants held out, 3 against 2 epochs: +0.0027 / +0.0010 / +0.0019 on three seeds; 4 against "
        "3 (known features only): 0.8211 → 0.8235.",
    )
    refit_lr_factor: float = Field(
        0.3, gt=0, le=1, description="Peak learning rate of the refit epochs as a share of `learning_rate` (cosine)."
    )
    batch_size: int = Field(256, ge=8, description="Training batch size.")
    seed: int = Field(42, description="Seed of splits, initialisation, dropout and shuffling.")
    validation_fraction: float = Field(0.1, gt=0, lt=0.5, description="Stratified validation share.")
    test_fraction: float = Field(
        0.1,
        ge=0,
        lt=0.5,
        description="Test share (metrics.json): the products whose title hash falls in it (`training.splits."
        "in_holdout`), so that at 0.1 or more it holds the fixed evaluation set of `train --every`.",
    )
    # thresholds / export
    precision_floor: float = Field(0.8, ge=0, le=1, description="Per-tag thresholds: best F1 with precision ≥ this.")
    min_threshold_positives: int = Field(5, ge=1, description="Tags with fewer validation positives keep default.")
    default_threshold: float = Field(0.5, gt=0, lt=1, description="thresholds.json default.")
    parity_samples: int = Field(2000, ge=64, description="Rows of the ONNX/Keras parity gate (at least 2000).")
    parity_atol: float = Field(1e-4, gt=0, description="Max |onnx − keras| allowed by the parity gate.")
    opset: int = Field(17, ge=13, le=21, description="ONNX opset of the export.")
    embedding_dtype: Literal["float32", "float16", "int8"] = Field(
        "int8",
        description="How the bundle stores the embedding tables: float16 (half the float32 memory), or int8 rows "
        "with a float32 scale per row (a quarter). The Keras tables are rounded the same way before evaluation, "
        "so the metrics and the parity gate describe the shipped model. JD merchants held out, leaf w-F1: 0.8176 "
        "float16, 0.8175 int8 (17 bits); 0.8194 / 0.8196 (18 bits).",
    )
    bag_chunk: int = Field(
        32,
        ge=0,
        description="Export each embedding bag in slices of this many token columns (0 = one piece): the same sums, "
        "~1.6x faster ONNX scoring at batch 64, since each slice's gathered rows stay in the CPU cache.",
    )
    bag_levels: int = Field(
        2,
        ge=0,
        le=4,
        description="With int8 tables and bag_chunk > 0: write each row's bag weights as this many 8-bit digits and "
        "multiply them with the int8 rows in integers (MatMulInteger), instead of casting the rows to float32 "
        "(0). ONNX batch 64 on the bench model: 2 digits ~1.2x faster than 0, scores within ~2e-5 of the float "
        "bag; 3 digits ~1.15x, within 1e-6. The parity gate checks the result either way.",
    )
    baseline: bool = Field(False, description="Also fit the same-run TF-IDF + linear baseline into metrics.json.")
    # `train --every`
    gate_min_products: int = Field(
        30,
        ge=1,
        description="`train --every`: the fewest evaluation products that neither the candidate nor the current "
        "model trained on for a fair comparison. When the current model trained on some of the evaluation set and "
        "fewer remain, both are compared on the whole set, which favours the current model (said in the cycle's "
        "JSON line).",
    )
    gate_max_labels_lost: float = Field(
        0.2,
        ge=0,
        le=1,
        description="`train --every`: the largest share of the current model's labels in one group (categories, "
        "each attribute, the free tags) a candidate may lack and still be published; a candidate that lacks a whole "
        "group of the current model is refused too (a catalog that lost a column or rows). 1 turns the share off.",
    )
    # runtime
    threads: int = Field(2, ge=1, description="TensorFlow intra-op threads (inter-op = 1..2).")
    # publish
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers for `publish`.")
    topic_prefix: str = Field("", description="Prefix of topic names (`<prefix>model-updates`).")

    @model_validator(mode="after")
    def _consistent(self) -> TrainerSettings:
        """Settings that are each valid but conflict, refused when the settings load (before any catalog is read)."""
        if self.char_ngram_min > self.char_ngram_max:
            raise PydanticCustomError(
                "conflicting_settings",
                "TAGSTREAM_CHAR_NGRAM_MIN={lo} is more than TAGSTREAM_CHAR_NGRAM_MAX={hi} (the shortest character "
                "n-gram must not be longer than the longest)",
                {"lo": self.char_ngram_min, "hi": self.char_ngram_max},
            )
        return self

    def signing_key(self) -> Ed25519PrivateKey | None:
        """The Ed25519 key of `signing_key_path` (None when unset); ConfigError when it cannot be read or is not a
        key. `train` loads it before fitting, so a wrong path fails at once, not after a long run."""
        if self.signing_key_path is None:
            return None
        from serving.bundle import load_signing_key

        path = Path(self.signing_key_path)
        try:
            return load_signing_key(path.read_bytes())
        except OSError as exc:
            raise ConfigError(
                f"TAGSTREAM_SIGNING_KEY_PATH={path}: cannot read the signing key ({exc.strerror or exc})"
            ) from exc
        except BundleError as exc:
            raise ConfigError(f"TAGSTREAM_SIGNING_KEY_PATH={path}: {exc}") from exc

    def verify_key(self) -> Ed25519PublicKey | None:
        """The Ed25519 public key of `model_verify_key` (as the workers read it), or None when unset."""
        if self.model_verify_key is None:
            return None
        from serving.validate import parse_verify_key

        return parse_verify_key(self.model_verify_key.get_secret_value())

    def featurizer_config(self) -> FeaturizerConfig:
        """The FeaturizerConfig these settings describe."""
        if self.char_ngram_min > self.char_ngram_max:
            raise ConfigError("char_ngram_min > char_ngram_max")
        return FeaturizerConfig(
            hash_bits=self.hash_bits,
            max_features=self.max_features,
            char_ngram_min=self.char_ngram_min,
            char_ngram_max=self.char_ngram_max,
            min_df=self.min_df,
            word_bigrams=self.word_bigrams != "none",
            bigrams_letters_only=self.word_bigrams == "letters",
            known_only=self.known_features,
        )


def load_trainer_settings(**overrides: Any) -> TrainerSettings:
    """Environment settings with the non-None `overrides` applied (ConfigError when invalid: a value out of range,
    or a TAGSTREAM_* variable that does not parse, e.g. TAGSTREAM_HIDDEN='[a]')."""
    from tagstream.settings import load_settings

    return load_settings(TrainerSettings, "trainer", **overrides)


def enclosing_bundle(path: str | Path) -> Path | None:
    """The model bundle `path` is or lies inside (a directory holding every file a bundle must have, SPEC §2), else
    None; None too for a path that cannot be resolved (a symlink loop: creating it then says why)."""
    from serving.bundle import MANIFEST_FILE, REQUIRED_FILES

    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError):
        return None
    for directory in (resolved, *resolved.parents):
        if all((directory / name).is_file() for name in (MANIFEST_FILE, *REQUIRED_FILES)):
            return directory
    return None


def writable_dir(path: str | Path, what: str) -> Path:
    """Create directory `path` (and its parents) now, so that a file in its place or a missing permission is a
    ConfigError naming `what` (e.g. "--out") before training, not a traceback after it. A path that is or lies
    inside a model bundle is refused: bundles are immutable, and one with anything added no longer validates."""
    import os

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path}: exists and is not a directory")
    if (bundle := enclosing_bundle(path)) is not None:
        inside = "is" if bundle == path.resolve() else "lies inside"
        raise ConfigError(
            f"{what} {path}: {inside} the model bundle {bundle}, which nothing may be written into (bundles are "
            f"immutable): give a directory outside it, e.g. its registry {bundle.parent}"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot create the directory ({exc.strerror or exc})") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: the directory is not writable")
    return path
