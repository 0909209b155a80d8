"""Product text → hashed TF-IDF features for the model (numpy only: shared by the worker's hot path and training).

A product becomes three arrays (SPEC §2 model inputs):

- ``ids`` int64 ``[N, L]``: hash buckets of its features, 0 = padding;
- ``weights`` float32 ``[N, L]``: sublinear TF × IDF, L2-normalised per row after the top-L cut (0 for padding);
- ``numeric`` float32 ``[N, K]``: a few dense signals, each clipped to the range its training products spanned
  (min/max saved at fit time; none in featurizers fitted before them) and standardised with the mean/std saved then.

Features, each hashed in its own namespace so that equal strings of different kinds do not collide on purpose:
character n-grams of the title (with a space at each end, so the n-grams see word and title boundaries; works for
Chinese and English alike), latin word and number+unit tokens of the title (plus adjacent word pairs), words and
character n-grams of the first characters of the description, the whole brand, and each category hint (whole and
by word). A product with more than L distinct features keeps the L highest-weighted ones.

Hashing is vectorised over a whole batch: the texts are joined into one codepoint array, a polynomial hash of every
span is read off one prefix sum (mod 2^64), and a murmur3 ``fmix64`` finaliser with a namespace seed spreads it.
It is deterministic across processes and machines (no Python ``hash()``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import threading
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tagstream.errors import FeaturizerError

__all__ = [
    "FEATURIZER_VERSION",
    "FeatureBatch",
    "Featurizer",
    "FeaturizerConfig",
    "ProductText",
    "normalize_text",
]

FEATURIZER_VERSION = "hashtfidf-2"
READABLE_VERSIONS = ("hashtfidf-1", FEATURIZER_VERSION)  # 1 = before the known-feature filter (known_only off)
SPEC_FILE = "featurizer.json"
IDF_FILE = "idf.npy"
KNOWN_FILE = "known.npy"

_WS = re.compile(r"\s+")
# Latin words (with accented letters) and numbers with an optional unit ("500mg", "64gb", "1.5l", "37").
_WORD = re.compile(r"[0-9]+(?:\.[0-9]+)?[a-z%]*|[a-z\u00df-\u024f]+")

_M64 = (1 << 64) - 1
_PRIME = 0x100000001B3  # FNV-64 prime: odd, so invertible mod 2^64
_PRIME_INV = pow(_PRIME, -1, 1 << 64)
_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_GOLDEN = 0x9E3779B97F4A7C15

# Namespace ids: part of the hash seed, never reorder (changing one changes every bucket: bump the version).
NAMESPACES: dict[str, int] = {
    "title_char": 1,
    "title_word": 2,
    "title_word2": 3,
    "desc_char": 4,
    "desc_word": 5,
    "brand": 6,
    "hint": 7,
    "hint_word": 8,
}

NUMERIC_FIELDS: tuple[str, ...] = ("log_price", "has_price", "log_title_chars", "cjk_fraction", "n_words")


def normalize_text(s: str | None) -> str:
    """NFKC (full/half width folding), casefold, collapse white space, strip; None → ''."""
    if not s:
        return ""
    return _WS.sub(" ", unicodedata.normalize("NFKC", s).casefold()).strip()


@runtime_checkable
class ProductText(Protocol):
    """What the featurizer reads from a product (CatalogProduct, ProductChange or a mapping with these keys)."""

    title: str | None
    description: str | None
    brand: str | None
    price: float | None


def _text_fields(p: Any) -> tuple[Any, Any, Any, Any, Any]:
    """A product's title, description, brand, category hints and price (None where missing): one type check per
    product (an ABC `isinstance` costs about a microsecond)."""
    if isinstance(p, Mapping):
        get = p.get
        return get("title"), get("description"), get("brand"), get("category_hints"), get("price")
    return (
        getattr(p, "title", None),
        getattr(p, "description", None),
        getattr(p, "brand", None),
        getattr(p, "category_hints", None),
        getattr(p, "price", None),
    )


@dataclass(frozen=True, slots=True)
class FeaturizerConfig:
    """Hashing and selection parameters (all saved in featurizer.json)."""

    hash_bits: int = 18  # buckets = 2**hash_bits, bucket 0 = padding
    max_features: int = 128  # L
    char_ngram_min: int = 1
    char_ngram_max: int = 3
    word_bigrams: bool = True
    # Only pairs of two words that start with a letter ("navy blue"); pairs with a number ("mate 60", "12gb 512gb")
    # are mostly one product's or one shop's model naming.
    bigrams_letters_only: bool = False
    max_title_chars: int = 200
    max_description_chars: int = 200
    sublinear_tf: bool = True
    min_df: int = 2  # buckets seen in fewer train products get IDF 0 (dropped: no information, only noise)
    seed: int = 0x5EED
    # Keep only features (64-bit hashes, before bucketing) that were in >= min_df training products. Without it, an
    # n-gram the model never saw lands on a bucket a known one trained (2^18 buckets hold ~234k known JD features
    # and ~356k once-seen ones) and adds that feature's weight as noise.
    known_only: bool = True

    def validate(self) -> None:
        """Raise FeaturizerError on impossible parameters."""
        if not 8 <= self.hash_bits <= 24:
            raise FeaturizerError(f"hash_bits must be in 8..24, got {self.hash_bits}")
        if not 1 <= self.max_features <= 4096:
            raise FeaturizerError(f"max_features must be in 1..4096, got {self.max_features}")
        if not 1 <= self.char_ngram_min <= self.char_ngram_max <= 8:
            raise FeaturizerError(f"bad char n-gram range {self.char_ngram_min}..{self.char_ngram_max}")
        if self.min_df < 1:
            raise FeaturizerError("min_df must be ≥ 1")


@dataclass(frozen=True, slots=True)
class FeatureBatch:
    """Model inputs for N products."""

    ids: np.ndarray  # int64 [N, L]
    weights: np.ndarray  # float32 [N, L]
    numeric: np.ndarray  # float32 [N, K]

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def take(self, index: np.ndarray | Sequence[int] | slice) -> FeatureBatch:
        """The rows at `index`."""
        return FeatureBatch(self.ids[index], self.weights[index], self.numeric[index])

    def as_inputs(self) -> dict[str, np.ndarray]:
        """The ONNX/Keras input dict {"ids", "weights", "numeric"}."""
        return {"ids": self.ids, "weights": self.weights, "numeric": self.numeric}

    @staticmethod
    def concat(batches: Sequence[FeatureBatch]) -> FeatureBatch:
        """Stack batches row-wise."""
        return FeatureBatch(
            np.concatenate([b.ids for b in batches]),
            np.concatenate([b.weights for b in batches]),
            np.concatenate([b.numeric for b in batches]),
        )


# ---------------------------------------------------------------------------------------------------------------
# vectorised hashing


class _Powers:
    """Cached tables P^k and P^-k mod 2^64, grown by doubling (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pow = np.ones(1, dtype=np.uint64)
        self.inv = np.ones(1, dtype=np.uint64)

    def ensure(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        pw, iv = self.pow, self.inv
        if len(pw) >= n:
            return pw, iv
        with self._lock:
            pw, iv = self.pow, self.inv
            while len(pw) < n:
                k = len(pw)
                pk = np.uint64(pow(_PRIME, k, 1 << 64))
                ik = np.uint64(pow(_PRIME_INV, k, 1 << 64))
                pw = np.concatenate([pw, pw * pk])
                iv = np.concatenate([iv, iv * ik])
            self.pow, self.inv = pw, iv
        return pw, iv


_POWERS = _Powers()
_POWERS.ensure(1 << 12)


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * _C1
    h = h ^ (h >> np.uint64(33))
    h = h * _C2
    return h ^ (h >> np.uint64(33))


class _Joined:
    """Texts of one field joined into one codepoint array with a NUL between rows, plus its prefix hash."""

    __slots__ = ("cp", "ends", "prefix", "pw", "row_of", "starts", "text")

    def __init__(self, texts: Sequence[str]) -> None:
        self.text = "\x00".join(texts) + "\x00"
        self.cp = np.frombuffer(self.text.encode("utf-32-le"), dtype=np.uint32)
        lens = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        self.ends = np.cumsum(lens + 1) - 1  # index of each row's NUL
        self.starts = self.ends - lens
        n = len(self.cp)
        pw, iv = _POWERS.ensure(n + 1)
        self.pw = pw
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum(self.cp.astype(np.uint64) * iv[:n], out=prefix[1:])
        self.prefix = prefix
        self.row_of = np.repeat(np.arange(len(texts), dtype=np.int64), lens + 1)

    def span_hash(self, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Position-independent polynomial hash of text[start:end] (uint64)."""
        return (self.prefix[end] - self.prefix[start]) * self.pw[end - 1]


def _seed(config: FeaturizerConfig, namespace: str, n: int = 0) -> np.uint64:
    return np.uint64((config.seed * _GOLDEN + NAMESPACES[namespace] * 0x1000193 + n * 0x51ED27) & _M64)


def _char_ngrams(
    j: _Joined, config: FeaturizerConfig, namespace: str
) -> tuple[np.ndarray, np.ndarray]:  # (rows, hashes)
    rows, hashes = [], []
    is_sep = j.cp == 0
    sep_cum = np.zeros(len(j.cp) + 1, dtype=np.int32)
    np.cumsum(is_sep, out=sep_cum[1:])
    is_space = j.cp == 32
    for n in range(config.char_ngram_min, config.char_ngram_max + 1):
        m = len(j.cp) - n + 1
        if m <= 0:
            continue
        start = np.arange(m, dtype=np.int64)
        ok = sep_cum[n : n + m] == sep_cum[:m]
        if n == 1:
            ok &= ~is_space[:m]
        start = start[ok]
        if not len(start):
            continue
        h = j.span_hash(start, start + n)
        hashes.append(h ^ _seed(config, namespace, n))
        rows.append(j.row_of[start])
    return _cat(rows, hashes)


def _words(
    j: _Joined, config: FeaturizerConfig, namespace: str, bigram_namespace: str | None
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], np.ndarray]:
    spans = [(m.start(), m.end()) for m in _WORD.finditer(j.text)]
    if not spans:
        empty = (np.zeros(0, np.int64), np.zeros(0, np.uint64))
        return empty, empty, np.zeros(0, np.int64)
    se = np.asarray(spans, dtype=np.int64)
    raw = j.span_hash(se[:, 0], se[:, 1])
    rows = j.row_of[se[:, 0]]
    words = (rows, raw ^ _seed(config, namespace))
    bigrams = (np.zeros(0, np.int64), np.zeros(0, np.uint64))
    if bigram_namespace is not None and len(raw) > 1:
        same = rows[1:] == rows[:-1]
        if config.bigrams_letters_only:
            letter = j.cp[se[:, 0]] >= ord("a")  # the text is lower-cased; digits are below "a"
            same &= letter[1:] & letter[:-1]
        h2 = _fmix64(raw[:-1] * np.uint64(_GOLDEN) + raw[1:])
        bigrams = (rows[1:][same], h2[same] ^ _seed(config, bigram_namespace))
    return words, bigrams, rows


def _cat(rows: list[np.ndarray], hashes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64)
    return np.concatenate(rows), np.concatenate(hashes)


def _whole(values: Sequence[str], config: FeaturizerConfig, namespace: str) -> tuple[np.ndarray, np.ndarray]:
    """One feature per non-empty string (brand, category hint); values[i] belongs to row i."""
    j = _Joined(values)
    keep = j.ends > j.starts
    start, end = j.starts[keep], j.ends[keep]
    return np.nonzero(keep)[0].astype(np.int64), j.span_hash(start, end) ^ _seed(config, namespace)


def _unique_counts(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique values and their counts (sort based: faster than np.unique's hash path here)."""
    if not len(key):
        return key, np.zeros(0, np.int64)
    key = np.sort(key)
    first = np.empty(len(key), dtype=bool)
    first[0] = True
    np.not_equal(key[1:], key[:-1], out=first[1:])
    idx = np.flatnonzero(first)
    return key[idx], np.diff(np.append(idx, len(key)))


def _is_cjk(cp: np.ndarray) -> np.ndarray:
    return ((cp >= 0x4E00) & (cp <= 0x9FFF)) | ((cp >= 0x3400) & (cp <= 0x4DBF)) | ((cp >= 0xAC00) & (cp <= 0xD7AF))


# ---------------------------------------------------------------------------------------------------------------


class Featurizer:
    """Fitted hashed TF-IDF featurizer; `fit` on the train set, `transform` anywhere, `save`/`load` with a bundle."""

    def __init__(
        self,
        config: FeaturizerConfig,
        idf: np.ndarray,
        numeric_mean: np.ndarray,
        numeric_std: np.ndarray,
        n_docs: int = 0,
        known: np.ndarray | None = None,
        numeric_min: np.ndarray | None = None,
        numeric_max: np.ndarray | None = None,
    ) -> None:
        config.validate()
        nb = 1 << config.hash_bits
        idf = np.asarray(idf, dtype=np.float32)
        if idf.shape != (nb,):
            raise FeaturizerError(f"idf has shape {idf.shape}, expected ({nb},) for hash_bits={config.hash_bits}")
        if not np.all(np.isfinite(idf)):
            raise FeaturizerError("idf holds NaN or inf")
        k = len(NUMERIC_FIELDS)
        self.numeric_mean = np.asarray(numeric_mean, dtype=np.float32).reshape(k)
        self.numeric_std = np.asarray(numeric_std, dtype=np.float32).reshape(k)
        if np.any(self.numeric_std <= 0):
            raise FeaturizerError("numeric std must be > 0")
        # Raw (before standardisation) float64 range of each numeric field over the training products; transform
        # clips to it. None (featurizers fitted before the bounds were saved): no clipping.
        self.numeric_min: np.ndarray | None = None
        self.numeric_max: np.ndarray | None = None
        if (numeric_min is None) != (numeric_max is None):
            raise FeaturizerError("numeric min and max must be given together")
        if numeric_min is not None and numeric_max is not None:
            lo = np.asarray(numeric_min, dtype=np.float64).reshape(k)
            hi = np.asarray(numeric_max, dtype=np.float64).reshape(k)
            if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo <= hi)):
                raise FeaturizerError("numeric min/max must be finite with min <= max")
            self.numeric_min, self.numeric_max = lo, hi
        if config.known_only:
            if known is None:
                raise FeaturizerError("known_only needs the known feature hashes")
            known = np.asarray(known)
            if known.dtype != np.uint64 or known.ndim != 1 or (len(known) > 1 and not np.all(known[1:] > known[:-1])):
                raise FeaturizerError("known feature hashes must be a sorted 1-D uint64 array without repeats")
        elif known is not None:
            raise FeaturizerError("known feature hashes given but known_only is off")
        self.config = config
        self.idf = idf
        self.known = known
        self._known_set = _KnownSet(known) if known is not None else None
        self.n_docs = int(n_docs)

    # -- fitting --------------------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, products: Iterable[Any], config: FeaturizerConfig | None = None) -> Featurizer:
        """IDF over hash buckets and numeric mean/std/min/max, computed on these (training) products."""
        config = config or FeaturizerConfig()
        config.validate()
        products = list(products)
        if not products:
            raise FeaturizerError("cannot fit a featurizer on no products")
        nb = 1 << config.hash_bits
        rows, features, _, numeric = _extract(products, config)
        known = None
        if config.known_only:  # per feature: the number of products it is in (one sort of the (feature, row) pairs)
            order = np.lexsort((rows, features))
            f_sorted, r_sorted = features[order], rows[order]
            new_pair = np.ones(len(f_sorted), dtype=bool)
            new_pair[1:] = (f_sorted[1:] != f_sorted[:-1]) | (r_sorted[1:] != r_sorted[:-1])
            feature, products_with = _unique_counts(f_sorted[new_pair])
            known = feature[products_with >= config.min_df]
            keep = _KnownSet(known).contains(features)
            rows, features = rows[keep], features[keep]
        key, _ = _unique_counts(rows * nb + _buckets(features, config).astype(np.int64))
        df = np.bincount(key % nb, minlength=nb)
        n = len(products)
        idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)
        idf[df < config.min_df] = 0.0
        idf[0] = 0.0
        mean = numeric.mean(axis=0)
        std = numeric.std(axis=0)
        std[std < 1e-6] = 1.0
        # The raw float64 values transform computes for these same products (per row, whatever the batch), so
        # clipping to their min/max leaves every training product's features exactly as they are.
        lo, hi = numeric.min(axis=0), numeric.max(axis=0)
        return cls(config, idf, mean, std, n_docs=n, known=known, numeric_min=lo, numeric_max=hi)

    # -- transforming ---------------------------------------------------------------------------------------------

    @property
    def max_features(self) -> int:
        """L, the width of ids/weights."""
        return self.config.max_features

    @property
    def n_numeric(self) -> int:
        """K, the width of numeric."""
        return len(NUMERIC_FIELDS)

    @property
    def n_buckets(self) -> int:
        """Number of hash buckets (embedding rows), bucket 0 is padding."""
        return 1 << self.config.hash_bits

    def transform(self, products: Iterable[Any]) -> FeatureBatch:
        """Features of a batch of products (objects or mappings with title, description, brand, price, ...)."""
        products = list(products)
        n, big_l, nb = len(products), self.config.max_features, self.n_buckets
        ids = np.zeros((n, big_l), dtype=np.int64)
        weights = np.zeros((n, big_l), dtype=np.float32)
        if n == 0:
            return FeatureBatch(ids, weights, np.zeros((0, self.n_numeric), np.float32))
        rows, features, _, numeric = _extract(products, self.config)
        if self._known_set is not None:
            keep = self._known_set.contains(features)
            rows, features = rows[keep], features[keep]
        buckets = _buckets(features, self.config)
        if self.numeric_min is not None:  # out-of-range signals (a price of 1e308) count as the training extremes
            numeric = np.clip(numeric, self.numeric_min, self.numeric_max)
        numeric = ((numeric - self.numeric_mean) / self.numeric_std).astype(np.float32)
        key, counts = _unique_counts(rows * nb + buckets.astype(np.int64))
        r = key // nb
        b = key - r * nb
        tf = (1.0 + np.log(counts)) if self.config.sublinear_tf else counts.astype(np.float64)
        w = (tf * self.idf[b]).astype(np.float32)
        keep = w > 0
        r, b, w = r[keep], b[keep], w[keep]
        if len(r):
            per_row = np.bincount(r, minlength=n)
            over = per_row > big_l
            if over.any():  # only rows with more than L features need a sort by weight
                sel = over[r]
                idx = np.flatnonzero(sel)
                idx = idx[np.lexsort((-w[idx], r[idx]))]
                order = np.concatenate([np.flatnonzero(~sel), idx])
                order = order[np.argsort(r[order], kind="stable")]
                r, b, w = r[order], b[order], w[order]
            first = np.searchsorted(r, r, side="left")
            rank = np.arange(len(r)) - first
            top = rank < big_l
            r, b, w, rank = r[top], b[top], w[top], rank[top]
            norm = np.sqrt(np.bincount(r, weights=w.astype(np.float64) ** 2, minlength=n))
            w = w / norm[r].astype(np.float32)
            ids[r, rank] = b
            weights[r, rank] = w
        return FeatureBatch(ids, weights, numeric)

    def transform_one(self, product: Any) -> FeatureBatch:
        """Features of one product (a batch of 1)."""
        return self.transform([product])

    # -- persistence ----------------------------------------------------------------------------------------------

    @property
    def spec(self) -> dict[str, Any]:
        """The featurizer.json content."""
        c = self.config
        return {
            "version": FEATURIZER_VERSION,
            "known_only": c.known_only,
            "n_known": 0 if self.known is None else len(self.known),
            "hashing": {
                "hash_bits": c.hash_bits,
                "n_buckets": self.n_buckets,
                "padding_id": 0,
                "seed": c.seed,
                "prime": _PRIME,
                "finaliser": "murmur3-fmix64",
                "namespaces": dict(NAMESPACES),
                "char_ngram_min": c.char_ngram_min,
                "char_ngram_max": c.char_ngram_max,
                "word_bigrams": c.word_bigrams,
                "bigrams_letters_only": c.bigrams_letters_only,
                "word_pattern": _WORD.pattern,
            },
            "max_features": c.max_features,
            "max_title_chars": c.max_title_chars,
            "max_description_chars": c.max_description_chars,
            "sublinear_tf": c.sublinear_tf,
            "min_df": c.min_df,
            "n_docs": self.n_docs,
            "numeric": self._numeric_spec(),
            "assets": {"idf": IDF_FILE, **({"known": KNOWN_FILE} if self.known is not None else {})},
        }

    def _numeric_spec(self) -> list[dict[str, Any]]:
        """One entry per numeric field: name, mean, std, and (when fitted with them) the raw min/max clipped to."""
        fields = [
            {"name": name, "mean": float(m), "std": float(s)}
            for name, m, s in zip(NUMERIC_FIELDS, self.numeric_mean, self.numeric_std, strict=True)
        ]
        if self.numeric_min is not None and self.numeric_max is not None:
            for f, lo, hi in zip(fields, self.numeric_min, self.numeric_max, strict=True):
                f["min"], f["max"] = float(lo), float(hi)  # float64: JSON keeps them exactly
        return fields

    def save(self, directory: str | Path) -> list[str]:
        """Write featurizer.json, idf.npy and (known_only) known.npy into `directory`; returns the names written."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / SPEC_FILE).write_text(json.dumps(self.spec, ensure_ascii=False, indent=2, sort_keys=True) + "\n")
        np.save(d / IDF_FILE, self.idf, allow_pickle=False)
        if self.known is None:
            return [SPEC_FILE, IDF_FILE]
        np.save(d / KNOWN_FILE, self.known, allow_pickle=False)
        return [SPEC_FILE, IDF_FILE, KNOWN_FILE]

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], idf: np.ndarray, known: np.ndarray | None = None) -> Featurizer:
        """Rebuild from a featurizer.json dict, the IDF array and the known feature hashes (FeaturizerError when they
        do not fit). Version 1 specs (no known-feature filter) are read too, and specs without numeric min/max
        (written before them) featurize as they did: no clipping."""
        try:
            if spec["version"] not in READABLE_VERSIONS:
                raise FeaturizerError(f"unsupported featurizer version {spec['version']!r}")
            h = spec["hashing"]
            if h.get("prime") != _PRIME or h.get("namespaces") != NAMESPACES:
                raise FeaturizerError("featurizer hashing parameters do not match this code")
            names = [f["name"] for f in spec["numeric"]]
            if tuple(names) != NUMERIC_FIELDS:
                raise FeaturizerError(f"numeric fields {names} do not match {list(NUMERIC_FIELDS)}")
            config = FeaturizerConfig(
                hash_bits=int(h["hash_bits"]),
                max_features=int(spec["max_features"]),
                char_ngram_min=int(h["char_ngram_min"]),
                char_ngram_max=int(h["char_ngram_max"]),
                word_bigrams=bool(h["word_bigrams"]),
                bigrams_letters_only=bool(h.get("bigrams_letters_only", False)),
                max_title_chars=int(spec["max_title_chars"]),
                max_description_chars=int(spec["max_description_chars"]),
                sublinear_tf=bool(spec["sublinear_tf"]),
                min_df=int(spec["min_df"]),
                seed=int(h["seed"]),
                known_only=spec["version"] != "hashtfidf-1" and bool(spec["known_only"]),
            )
            mean = [float(f["mean"]) for f in spec["numeric"]]
            std = [float(f["std"]) for f in spec["numeric"]]
            bounded = ["min" in f or "max" in f for f in spec["numeric"]]
            if any(bounded) and not all("min" in f and "max" in f for f in spec["numeric"]):
                raise FeaturizerError("numeric min/max must be given for every numeric field or for none")
            lo = [float(f["min"]) for f in spec["numeric"]] if any(bounded) else None
            hi = [float(f["max"]) for f in spec["numeric"]] if any(bounded) else None
        except (KeyError, TypeError, ValueError) as exc:
            raise FeaturizerError(f"invalid featurizer spec: {exc!r}") from exc
        if known is not None and len(known) != spec.get("n_known"):
            raise FeaturizerError(f"known.npy holds {len(known)} hashes, featurizer.json says {spec.get('n_known')}")
        return cls(
            config,
            idf,
            mean,
            std,
            n_docs=int(spec.get("n_docs", 0)),
            known=known,
            numeric_min=lo,
            numeric_max=hi,
        )

    @classmethod
    def load(cls, directory: str | Path, sha256: Mapping[str, str] | None = None) -> Featurizer:
        """Read featurizer.json + its assets from `directory`. With `sha256` (file name → hex digest: a bundle
        manifest's `files`), each file must hash to its digest, and is parsed from the very bytes hashed."""
        d = Path(directory)

        def read(name: str) -> bytes:
            data = (d / name).read_bytes()
            if sha256 is not None:
                expected = sha256.get(name)
                if not isinstance(expected, str) or hashlib.sha256(data).hexdigest() != expected.lower():
                    raise FeaturizerError(f"{name}: sha256 does not match the bundle manifest")
            return data

        try:
            spec = json.loads(read(SPEC_FILE).decode("utf-8"))
            assets = spec.get("assets", {})
            idf = np.load(io.BytesIO(read(assets.get("idf", IDF_FILE))), allow_pickle=False)
            known = np.load(io.BytesIO(read(assets["known"])), allow_pickle=False) if "known" in assets else None
        except (OSError, ValueError, TypeError, AttributeError, RecursionError, MemoryError) as exc:
            # a JSON nested too deep, an .npy header claiming more memory than there is: refused, not a crash
            raise FeaturizerError(f"cannot read featurizer from {d}: {type(exc).__name__}: {exc}") from None
        return cls.from_spec(spec, idf, known)

    def __repr__(self) -> str:
        return f"Featurizer({self.config}, n_docs={self.n_docs})"


# ---------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Texts:
    titles: list[str] = field(default_factory=list)
    descs: list[str] = field(default_factory=list)
    brands: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    hint_rows: list[int] = field(default_factory=list)
    prices: list[float] = field(default_factory=list)


def _texts(products: Sequence[Any], config: FeaturizerConfig) -> _Texts:
    t = _Texts()
    for i, p in enumerate(products):
        title, desc, brand, hints, price = _text_fields(p)
        title = normalize_text(title)[: config.max_title_chars]
        t.titles.append(f" {title} " if title else "")
        t.descs.append(
            normalize_text(desc[: config.max_description_chars * 2])[: config.max_description_chars] if desc else ""
        )
        t.brands.append(normalize_text(brand))
        for h in hints or ():
            h = normalize_text(h)
            if h:
                t.hints.append(h)
                t.hint_rows.append(i)
        try:
            price = float(price) if price is not None else math.nan
        except (TypeError, ValueError):
            price = math.nan
        t.prices.append(price if price >= 0 else math.nan)
    return t


class _KnownSet:
    """Exact membership of feature hashes: an open-addressing table (linear probing, load ≤ 1/4) looked up for a
    whole batch at once. A batch of 64 titles (~7,700 hashes) takes ~0.09 ms here; `np.searchsorted` into the
    sorted array took ~1.1 ms (each query a cache-missing binary search)."""

    def __init__(self, known: np.ndarray) -> None:
        n = len(known)
        size = 1 << max(1, (4 * max(n, 1) - 1).bit_length())
        self._mask = size - 1
        self._table = np.zeros(size, dtype=np.uint64)  # 0 = empty slot
        self._has_zero = bool(n and known[0] == 0)  # hash 0 is known apart (sorted: it would be first)
        keys = known[1:] if self._has_zero else known
        pos = (keys & np.uint64(self._mask)).astype(np.int64)
        self._max_probe = 0
        while len(keys):  # each round places one key per free slot wanted (the first wanting it), the rest move on
            free = np.flatnonzero(self._table[pos] == 0)
            slots, first = np.unique(pos[free], return_index=True)
            placed = np.zeros(len(keys), dtype=bool)
            placed[free[first]] = True
            self._table[slots] = keys[free[first]]
            keys, pos = keys[~placed], (pos[~placed] + 1) & self._mask
            self._max_probe += 1

    def contains(self, features: np.ndarray) -> np.ndarray:
        """Which `features` are known."""
        zero = features == 0  # never probed: 0 marks an empty slot
        out = zero if self._has_zero else np.zeros(len(features), dtype=bool)
        idx = np.flatnonzero(~zero)
        keys = features[idx]
        pos = (keys & np.uint64(self._mask)).astype(np.int64)
        for _ in range(self._max_probe):
            if not len(idx):
                break
            seen = self._table[pos]
            hit = seen == keys
            out[idx[hit]] = True
            more = ~hit & (seen != 0)  # an empty slot ends a key's probe: it is not known
            idx, keys, pos = idx[more], keys[more], (pos[more] + 1) & self._mask
        return out


def _buckets(features: np.ndarray, config: FeaturizerConfig) -> np.ndarray:
    """The hash bucket (1..nb-1, uint64) of each feature hash; bucket 0 is padding."""
    return features % np.uint64((1 << config.hash_bits) - 1) + np.uint64(1)


def _extract(products: Sequence[Any], config: FeaturizerConfig) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """(rows int64, feature hashes uint64 (murmur3-fmix64, before bucketing), n, raw numeric float64
    [n, K]) for a batch."""
    n = len(products)
    t = _texts(products, config)
    rows: list[np.ndarray] = []
    hashes: list[np.ndarray] = []

    title = _Joined(t.titles)
    r, h = _char_ngrams(title, config, "title_char")
    rows.append(r)
    hashes.append(h)
    (wr, wh), (br, bh), word_rows = _words(title, config, "title_word", "title_word2" if config.word_bigrams else None)
    rows += [wr, br]
    hashes += [wh, bh]

    if any(t.descs):
        desc = _Joined(t.descs)
        r, h = _char_ngrams(desc, config, "desc_char")
        (wr, wh), _, _ = _words(desc, config, "desc_word", None)
        rows += [r, wr]
        hashes += [h, wh]
    if any(t.brands):
        r, h = _whole(t.brands, config, "brand")
        rows.append(r)
        hashes.append(h)
    if t.hints:
        hint_rows = np.asarray(t.hint_rows, dtype=np.int64)
        r, h = _whole(t.hints, config, "hint")
        rows.append(hint_rows[r])
        hashes.append(h)
        hj = _Joined(t.hints)
        (wr, wh), _, _ = _words(hj, config, "hint_word", None)
        rows.append(hint_rows[wr])
        hashes.append(wh)

    all_rows = np.concatenate(rows)
    features = _fmix64(np.concatenate(hashes))

    # numeric: log1p(price), has_price, log1p(title chars), CJK fraction, log1p(word count)
    price = np.asarray(t.prices, dtype=np.float64)
    has_price = np.isfinite(price)
    lens = (title.ends - title.starts - np.where(title.ends > title.starts, 2, 0)).astype(np.float64)
    cjk = np.bincount(title.row_of, weights=_is_cjk(title.cp), minlength=n)[:n]
    n_words = np.bincount(word_rows, minlength=n)[:n].astype(np.float64)
    numeric = np.stack(
        [
            np.where(has_price, np.log1p(np.where(has_price, price, 0.0)), 0.0),
            has_price.astype(np.float64),
            np.log1p(lens),
            cjk / np.maximum(lens, 1.0),
            np.log1p(n_words),
        ],
        axis=1,
    )
    return all_rows, features, n, numeric
