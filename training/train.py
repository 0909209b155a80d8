"""The training pipeline: products → features → labels → split → fit → thresholds → evaluate → export → parity →
bundle (SPEC §2) in the registry. TensorFlow is imported inside the functions that need it.

Fitting: early stopping on validation picks the best epoch, the per-tag thresholds are tuned on validation, then
`refit_epochs` more epochs on train + validation (lower, restarted learning rate; thresholds kept) give the shipped
model all the labelled data.

`train(products, settings) -> Path` is the whole pipeline; `fit(...)` (features + model + thresholds, no export)
is what benchmarks and the periodic retrainer reuse.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.featurizer import FEATURIZER_VERSION, FeatureBatch, Featurizer
from tagstream.errors import BaselineProcessError, ConfigError, DataError
from training.catalog import CatalogProduct
from training.labels import LabelMap, LabelMatrix, build_label_map, check_attribute_names, check_tag_names
from training.settings import TrainerSettings, writable_dir

if TYPE_CHECKING:
    from serving.bundle import Thresholds

__all__ = [
    "FitResult",
    "evaluate_scores",
    "featurize",
    "fit",
    "held_out_metrics",
    "products_sha256",
    "train",
    "tune_thresholds",
    "validation_score",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- helpers


def configure_tensorflow(threads: int) -> None:
    """Quiet TensorFlow and pin its thread pools (only effective before the runtime starts)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # a category level of one label (training.labels) is a softmax over one column, which scores 1 by design
    warnings.filterwarnings("ignore", message=r"You are using a softmax over axis .* This axis has size 1\.")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError:  # already initialised in this process
        pass
    tf.get_logger().setLevel(logging.ERROR)


@contextlib.contextmanager
def keras_progress_to_stderr() -> Iterator[None]:
    """Send what Keras prints (its epoch progress bars, written to `sys.stdout`) to stderr: `tagstream train`'s
    stdout is the bundle path (or `--every`'s JSON lines, one per cycle) alone, for `B=$(tagstream train ...)`."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def products_sha256(products: Sequence[CatalogProduct]) -> str:
    """sha256 of the canonical JSONL of the training products (the manifest's training_data_sha256)."""
    h = hashlib.sha256()
    for p in products:
        h.update(json.dumps(p.to_json(), ensure_ascii=False, sort_keys=True).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def featurize(
    featurizer: Featurizer, products: Sequence[Any], *, chunk: int = 8192, progress: bool = True
) -> FeatureBatch:
    """Transform in chunks with a progress bar."""
    from tqdm import tqdm

    parts = []
    bar = tqdm(total=len(products), desc="featurize", unit="product", disable=not progress, leave=False)
    for s in range(0, len(products), chunk):
        parts.append(featurizer.transform(products[s : s + chunk]))
        bar.update(min(chunk, len(products) - s))
    bar.close()
    if not parts:
        return featurizer.transform([])
    return FeatureBatch.concat(parts)


def tune_thresholds(
    scores: np.ndarray,
    labels: LabelMatrix,
    label_map: LabelMap,
    *,
    precision_floor: float = 0.8,
    min_positives: int = 5,
    default: float = 0.5,
    lo: float = 0.02,
    hi: float = 0.98,
) -> dict[str, float]:
    """Per-tag threshold: best F1 of `score ≥ t` on rows labelled in the tag's group, with precision ≥ floor.

    The threshold is the midpoint between the last accepted and the next score. A tag with fewer than
    `min_positives` positives keeps `default`; one whose precision never reaches the floor gets the threshold of
    its best precision (at least `default`), so it is emitted rarely rather than wrongly. Clipped to [lo, hi].
    """
    out: dict[str, float] = {}
    gi = {g: i for i, g in enumerate(label_map.group_names)}
    for lab in label_map.labels:
        rows = labels.mask[:, gi[lab.group]]
        s = scores[rows, lab.index]
        y = labels.y[rows, lab.index] > 0
        pos = int(y.sum())
        if pos < min_positives:
            out[lab.tag] = default
            continue
        order = np.argsort(-s, kind="stable")
        s_sorted, y_sorted = s[order], y[order]
        tp = np.cumsum(y_sorted)
        k = np.arange(1, len(s_sorted) + 1)
        precision = tp / k
        recall = tp / pos
        f1 = np.where(tp > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
        # only cut between distinct scores
        last_of_tie = np.r_[s_sorted[1:] < s_sorted[:-1], True]
        ok = last_of_tie & (precision >= precision_floor)
        if ok.any():
            j = int(np.argmax(np.where(ok, f1, -1.0)))
        else:
            j = int(np.argmax(np.where(last_of_tie, precision, -1.0)))
        nxt = s_sorted[j + 1] if j + 1 < len(s_sorted) else 0.0
        t = float((s_sorted[j] + nxt) / 2.0)
        if not ok.any():
            t = max(t, default)
        out[lab.tag] = float(np.clip(t, lo, hi))
    return out


def clear_thresholds(thresholds: np.ndarray, scores: np.ndarray, eps: float = 2e-5) -> np.ndarray:
    """Move any threshold that lies within `eps` of a reference score to the middle of the nearest clear gap.

    Keeps the parity gate's "no decision flips" meaningful: a score within float noise of its threshold would
    flip on rounding alone (training passes half the gate's tolerance: the integer bag moves scores by up to ~2e-5).
    """
    th = thresholds.astype(np.float64).copy()
    for j in range(len(th)):
        col = scores[:, j]
        near = np.abs(col - th[j]) <= eps
        if not near.any():
            continue
        vals = np.unique(np.r_[col, 0.0, 1.0])
        gaps = np.diff(vals)
        mids = (vals[:-1] + vals[1:]) / 2
        good = gaps > 4 * eps
        if good.any():
            th[j] = float(mids[good][np.argmin(np.abs(mids[good] - th[j]))])
    return th.astype(np.float32)


def evaluate_scores(
    scores: np.ndarray,
    labels: LabelMatrix,
    label_map: LabelMap,
    thresholds: dict[str, float] | None = None,
    *,
    full: bool = False,
    unknown: dict[str, list[Any]] | None = None,
) -> dict[str, Any]:
    """Per exclusive group report via `training.evaluate.evaluate_exclusive` (`{"n", "groups": {group: figures}}`).

    Without thresholds the prediction is the group's top label (top-1); with them, "no tag" below threshold.
    `full=False` keeps only the headline figures. With `unknown` (`training.evaluate.unknown_labels` of the same
    products), a product whose label the model does not know is a miss, and every group reports `n_unknown`, how
    many such products it has.
    """
    from training.evaluate import evaluate_exclusive

    report = evaluate_exclusive(scores, labels, label_map, thresholds, unknown=unknown)
    if not full:
        keep = ("n", "n_labels", "n_unknown", "accuracy", "coverage", "micro_f1", "macro_f1", "weighted_f1")
        report["groups"] = {g: {k: v for k, v in r.items() if k in keep} for g, r in report["groups"].items()}
    return report


# --------------------------------------------------------------------------------------------------- fitting


@dataclass
class FitResult:
    """A fitted featurizer + Keras models + thresholds, with what happened."""

    featurizer: Featurizer
    label_map: LabelMap
    models: Any  # training.model.TaggerModels
    thresholds: dict[str, float]
    history: dict[str, list[float]]
    timings: dict[str, float] = field(default_factory=dict)

    def predict(self, features: FeatureBatch, batch_size: int = 4096) -> np.ndarray:
        """Keras scores [N, T] (float32)."""
        return predict_keras(self.models.scores, features, batch_size)


def predict_keras(model: Any, features: FeatureBatch, batch_size: int = 4096) -> np.ndarray:
    """Run the Keras scoring model in inference mode over batches."""
    if len(features) == 0:
        return np.zeros((0, model.output.shape[-1]), np.float32)
    outs = []
    for s in range(0, len(features), batch_size):
        part = features.take(slice(s, s + batch_size))
        outs.append(np.asarray(model(part.as_inputs(), training=False)))
    return np.concatenate(outs).astype(np.float32)


def model_config(settings: TrainerSettings):
    """ModelConfig from the settings (every ModelConfig field has a setting of the same name but `group_weights`)."""
    from dataclasses import fields

    from training.model import ModelConfig

    return ModelConfig(**{f.name: getattr(settings, f.name) for f in fields(ModelConfig) if f.name != "group_weights"})


def fit(
    train_products: Sequence[CatalogProduct],
    val_products: Sequence[CatalogProduct],
    settings: TrainerSettings,
    *,
    label_map: LabelMap | None = None,
    progress: bool = True,
) -> FitResult:
    """Fit the featurizer on train, the model on train with early stopping on validation, thresholds on validation,
    then (`refit_epochs`) the model a little further on train + validation."""
    if not train_products or not val_products:
        raise DataError("training needs non-empty train and validation sets")
    t0 = time.perf_counter()
    label_map = label_map or build_label_map(train_products, min_support=settings.min_support)
    featurizer = Featurizer.fit(train_products, settings.featurizer_config())
    x_train = featurize(featurizer, train_products, progress=progress)
    x_val = featurize(featurizer, val_products, progress=progress)
    y_train = label_map.encode(train_products)
    y_val = label_map.encode(val_products)
    t_feat = time.perf_counter() - t0

    configure_tensorflow(settings.threads)
    import keras

    from training.batches import keras_batches
    from training.model import LazyAdam, build_models, class_weights, make_loss

    cfg = model_config(settings)
    models = build_models(
        label_map,
        n_buckets=featurizer.n_buckets,
        max_features=featurizer.max_features,
        n_numeric=featurizer.n_numeric,
        config=cfg,
    )
    weights = class_weights(label_map, y_train.y, cfg.class_weight_power)
    loss = make_loss(label_map, weights, cfg)
    steps = max(1, -(-len(train_products) // settings.batch_size)) * settings.epochs
    schedule = keras.optimizers.schedules.CosineDecay(
        settings.learning_rate, decay_steps=steps, alpha=0.05, warmup_target=None
    )
    n_out = len(models.train.outputs)
    models.train.compile(
        optimizer=LazyAdam(
            schedule, sparse_lr_multiplier=cfg.sparse_lr_multiplier, sparse_weight_decay=cfg.sparse_weight_decay
        ),
        loss=[loss] * n_out,
    )
    if settings.monitor == "val_loss":
        callbacks = [
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=settings.patience, restore_best_weights=True, verbose=0
            )
        ]
    else:
        callbacks = [_best_f1_weights(models, x_val, y_val, label_map, patience=settings.patience)]
    train_batches = keras_batches(
        x_train.as_inputs(),
        y_train.y,
        n_outputs=n_out,
        batch_size=settings.batch_size,
        shuffle=True,
        seed=settings.seed,
    )
    val_batches = keras_batches(
        x_val.as_inputs(), y_val.y, n_outputs=n_out, batch_size=settings.batch_size, shuffle=False, seed=settings.seed
    )
    t1 = time.perf_counter()
    with keras_progress_to_stderr():
        hist = models.train.fit(
            train_batches,
            validation_data=val_batches,
            epochs=settings.epochs,
            shuffle=False,  # keras_batches shuffles (Keras only warns about datasets)
            callbacks=callbacks,
            verbose=(1 if sys.stderr.isatty() else 2) if progress else 0,
        )
    t_fit = time.perf_counter() - t1
    val_scores = predict_keras(models.scores, x_val)
    thresholds = tune_thresholds(
        val_scores,
        y_val,
        label_map,
        precision_floor=settings.precision_floor,
        min_positives=settings.min_threshold_positives,
        default=settings.default_threshold,
    )
    history = {k: [float(x) for x in v] for k, v in hist.history.items()}
    history.update(getattr(callbacks[0], "history", {}))
    t_refit = 0.0
    if settings.refit_epochs > 0:
        t2 = time.perf_counter()
        history["refit_loss"] = _refit(models, x_train, x_val, y_train, y_val, settings, progress=progress)
        t_refit = time.perf_counter() - t2
    return FitResult(
        featurizer,
        label_map,
        models,
        thresholds,
        history,
        {"featurize_s": t_feat, "fit_s": t_fit, "refit_s": t_refit, "epochs_run": len(history.get("loss", []))},
    )


def _baseline_result(
    job: Any, train_p: Sequence[CatalogProduct], eval_p: Sequence[CatalogProduct], label_map: LabelMap
) -> np.ndarray:
    """The background baseline's scores; when its process ended without any (killed, out of memory), the baseline
    trained here instead, so the run still reports it."""
    from training.baseline import baseline_scores

    try:
        return job.result()
    except BaselineProcessError as exc:
        log.warning("%s; training the baseline in this process instead", exc)
        return baseline_scores(train_p, eval_p, label_map)


def _parity_products(pool: Sequence[CatalogProduct], n: int, seed: int) -> list[CatalogProduct]:
    """`n` products for the parity gate: the pool's first `n` (held-out ones first), and when the catalog has fewer,
    as many more made of two of its products each (the titles, descriptions and attributes of both; seeded), so a
    small catalog's model is still compared on `n` inputs its featurizer makes from that catalog's text."""
    chosen = list(pool[:n])
    if len(chosen) >= n or not pool:
        return chosen
    rng = np.random.default_rng(seed)
    while len(chosen) < n:
        a, b = (pool[int(i)] for i in rng.integers(0, len(pool), size=2))
        chosen.append(
            dataclasses.replace(
                a,
                product_id=f"parity-{len(chosen)}",
                title=f"{a.title} {b.title}",
                description=" ".join(d for d in (a.description, b.description) if d) or None,
                attributes={**b.attributes, **a.attributes},
            )
        )
    return chosen


def _refit(
    models: Any,
    x_train: FeatureBatch,
    x_val: FeatureBatch,
    y_train: LabelMatrix,
    y_val: LabelMatrix,
    settings: TrainerSettings,
    *,
    progress: bool,
) -> list[float]:
    """`settings.refit_epochs` more epochs on train + validation from the selected weights: the optimiser state is
    kept and the learning rate restarts at `learning_rate × refit_lr_factor`, cosine-decayed over the refit steps.
    Returns the refit epochs' training losses."""
    import keras
    from keras import ops

    from training.batches import keras_batches

    class RestartedCosine(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self, initial: float, start: int, steps: int, alpha: float = 0.05) -> None:
            self.initial, self.start, self.steps, self.alpha = initial, start, steps, alpha

        def __call__(self, step: Any) -> Any:
            t = ops.clip((ops.cast(step, "float32") - self.start) / self.steps, 0.0, 1.0)
            return self.initial * (self.alpha + (1.0 - self.alpha) * 0.5 * (1.0 + ops.cos(np.pi * t)))

        def get_config(self) -> dict[str, Any]:
            return {"initial": self.initial, "start": self.start, "steps": self.steps, "alpha": self.alpha}

    steps = max(1, -(-(len(x_train) + len(x_val)) // settings.batch_size)) * settings.refit_epochs
    opt = models.train.optimizer
    opt.learning_rate = RestartedCosine(
        settings.learning_rate * settings.refit_lr_factor, int(opt.iterations.numpy()), steps
    )
    models.train.compile(optimizer=opt, loss=models.train.loss)  # re-trace the train step with the new schedule
    batches = keras_batches(
        FeatureBatch.concat([x_train, x_val]).as_inputs(),
        np.concatenate([y_train.y, y_val.y]),
        n_outputs=len(models.train.outputs),
        batch_size=settings.batch_size,
        shuffle=True,
        seed=settings.seed + 1,
    )
    with keras_progress_to_stderr():
        hist = models.train.fit(
            batches,
            epochs=settings.refit_epochs,
            shuffle=False,  # keras_batches shuffles
            verbose=(1 if sys.stderr.isatty() else 2) if progress else 0,
        )
    return [float(v) for v in hist.history["loss"]]


def validation_score(report: dict[str, Any]) -> float | None:
    """The mean weighted F1 (top-1) of the exclusive groups of an `evaluate_scores` report that validation
    evaluates: a group no validation product carries a label of (a rare attribute, a small catalog) has no figure and
    is left out; None when no group has one (a catalog of free tags only)."""
    figures = [g["weighted_f1"] for g in report["groups"].values() if g.get("weighted_f1") is not None]
    return float(np.mean(figures)) if figures else None


def _best_f1_weights(models: Any, x_val: Any, y_val: Any, label_map: LabelMap, *, patience: int) -> Any:
    """A Keras callback keeping the weights of the epoch with the best validation score — the mean weighted F1 of
    the exclusive groups (top-1) that validation evaluates, or the lowest validation loss when it evaluates none (a
    catalog of free tags only; `val_f1` 0.0) — and stopping after `patience` epochs without improvement."""
    import keras

    class BestF1Weights(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.best: tuple[float, list[np.ndarray]] | None = None
            self.wait = 0
            self.history: dict[str, list[float]] = {"val_f1": []}

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            f1 = validation_score(evaluate_scores(predict_keras(models.scores, x_val), y_val, label_map))
            self.history["val_f1"].append(0.0 if f1 is None else f1)
            score = f1 if f1 is not None else -float((logs or {}).get("val_loss", 0.0))
            if self.best is None or score > self.best[0]:
                self.best = (score, [np.array(v.value) for v in self.model.trainable_variables])
                self.wait = 0
            else:
                self.wait += 1
                self.model.stop_training = self.wait > patience

        def on_train_end(self, logs: Any = None) -> None:
            if self.best is not None:
                for variable, value in zip(self.model.trainable_variables, self.best[1], strict=True):
                    variable.assign(value)

    return BestF1Weights()


# --------------------------------------------------------------------------------------------------- pipeline


def train(
    products: Sequence[CatalogProduct],
    settings: TrainerSettings | None = None,
    *,
    registry: str | Path | None = None,
    split: Any = None,
    data_sha256: str | None = None,
    progress: bool = True,
    extra_metrics: dict[str, Any] | None = None,
    on_fit: Callable[[FitResult], None] | None = None,
) -> Path:
    """Train, evaluate, export, parity-check and write a bundle into the registry; returns the bundle directory.

    `split` (a `training.splits.Split`) overrides the default one (`holdout_split`: the test part is the fixed
    evaluation set of `train --every`, train and validation stratified from the rest); `data_sha256` the hash of the
    products. `on_fit` sees the fitted result once its tables hold the values the bundle ships.
    """
    from serving.bundle import Thresholds, golden_inputs, write_bundle
    from training.export import check_parity, export_onnx
    from training.splits import holdout_split, trained_on_record

    settings = settings or TrainerSettings()
    products = list(products)
    if len(products) < 20:
        raise DataError(f"need at least 20 products to train, got {len(products)}")
    # what the bundle needs at the end is checked before the long part: the registry and the signing key
    registry = writable_dir(registry if registry is not None else settings.model_registry, "registry")
    signing_key = settings.signing_key()
    t0 = time.perf_counter()
    check_attribute_names(products)  # names a worker could not tell apart are refused wherever they are
    check_tag_names(products)
    if split is None:  # the test part is the fixed evaluation set `train --every` compares models on
        split = holdout_split(
            products,
            validation=settings.validation_fraction,
            test=settings.test_fraction,
            seed=settings.seed,
        )
    train_p, val_p, test_p = split.train, split.validation, split.test
    if not val_p:
        raise ConfigError("the split has no validation products")
    # the labels of the products that shape the model: a label only the held-out test part carries is one the model
    # cannot have learnt, counted as unknown (a miss, `n_unknown`) in the evaluation
    label_map = build_label_map(
        [*train_p, *val_p], min_support=settings.min_support, names_checked=True, catalog_size=len(products)
    )
    log.info(
        "training on %d products (%d val, %d test), %d labels", len(train_p), len(val_p), len(test_p), len(label_map)
    )
    eval_p = test_p or val_p
    # the products the shipped weights are fitted on: the refit adds validation to training (never when validation
    # is what is evaluated); the baseline is fitted on the same ones, so the two are compared on equal data
    fitted_on = [*train_p, *val_p] if settings.refit_epochs > 0 and test_p else list(train_p)
    baseline = None
    if settings.baseline:  # beside the fit, which leaves part of the second core idle
        from training.baseline import BaselineJob

        baseline = BaselineJob(fitted_on, eval_p, label_map)
    try:
        result = fit(train_p, val_p, settings, label_map=label_map, progress=progress)
        base_scores = _baseline_result(baseline, fitted_on, eval_p, label_map) if baseline is not None else None
    except BaseException:
        if baseline is not None:
            baseline.cancel()
        raise
    fz, models = result.featurizer, result.models
    from training.model import round_embeddings

    # before evaluation (and `on_fit`): the metrics describe the shipped tables
    round_embeddings(models.scores, settings.embedding_dtype)
    if on_fit is not None:
        on_fit(result)

    # scores on test (evaluated below, once the shipped thresholds are known)
    x_eval = featurize(fz, eval_p, progress=progress)
    eval_scores = predict_keras(models.scores, x_eval)
    metrics: dict[str, Any] = {
        "split": {"train": len(train_p), "validation": len(val_p), "test": len(test_p)},
        "evaluated_on": "test" if test_p else "validation",
        # which products shaped the weights, so that `train --every` compares models only on products neither saw
        "trained_on": trained_on_record([*train_p, *val_p]),
        # label groups of the catalog the model does not have (one label, too little support): the data report's
        # warnings (`tagstream train` adds them to its report)
        "label_warnings": list(label_map.warnings),
        "history": result.history,
        "settings": json.loads(settings.model_dump_json(exclude={"signing_key_path"})),
    }

    # export + parity on ≥ parity_samples rows (test, validation, then train rows)
    t_exp = time.perf_counter()
    onnx_bytes = export_onnx(
        models.scores,
        n_numeric=fz.n_numeric,
        opset=settings.opset,
        embedding_dtype=settings.embedding_dtype,
        bag_chunk=settings.bag_chunk,
        max_tokens=settings.max_features,
        bag_levels=settings.bag_levels,
    )
    pool = list(eval_p) + list(val_p) + list(train_p)
    n_par = max(settings.parity_samples, 2000)
    x_par = featurize(fz, _parity_products(pool, n_par, settings.seed), progress=False)
    keras_par = predict_keras(models.scores, x_par)
    tags = [lab.tag for lab in label_map.labels]
    th_vec = np.asarray([result.thresholds[t] for t in tags], dtype=np.float32)
    th_vec = clear_thresholds(th_vec, keras_par, eps=settings.parity_atol / 2)
    thresholds = {t: round(float(v), 6) for t, v in zip(tags, th_vec, strict=True)}
    th_vec = np.asarray([thresholds[t] for t in tags], dtype=np.float32)
    parity = check_parity(onnx_bytes, keras_par, x_par, th_vec, atol=settings.parity_atol, min_samples=2000)
    metrics["parity"] = parity.to_json()
    t_exp = time.perf_counter() - t_exp
    # evaluate on test as `tagstream evaluate` does, the served tags at the shipped thresholds
    shipped = Thresholds(default=settings.default_threshold, per_tag=thresholds)
    metrics.update(held_out_metrics(eval_scores, eval_p, label_map, shipped, baseline=base_scores))
    if "baseline" in metrics:  # fitted on the products the shipped weights were: compared on equal data
        metrics["baseline"]["n_train"] = len(fitted_on)
    if extra_metrics:
        metrics.update(extra_metrics)
    if isinstance(data := metrics.get("data_report"), dict) and label_map.warnings:
        said = list(data.get("warnings") or ())
        metrics["data_report"] = {**data, "warnings": said + [w for w in label_map.warnings if w not in said]}
    metrics["timings"] = {**result.timings, "export_parity_s": t_exp, "total_s": time.perf_counter() - t0}

    golden_n = min(64, len(x_par))
    golden = {
        "ids": x_par.ids[:golden_n],
        "weights": x_par.weights[:golden_n],
        "numeric": x_par.numeric[:golden_n],
        "scores": keras_par[:golden_n],
        # validation checks the bundle's featurizer against them
        "inputs": golden_inputs(pool[:golden_n], description_chars=2 * fz.config.max_description_chars),
    }
    try:
        bundle = write_bundle(
            registry,
            onnx_bytes=onnx_bytes,
            labels=label_map.to_json(),
            thresholds={"format_version": 1, "default": settings.default_threshold, "per_tag": thresholds},
            featurizer_files=fz.save,
            metrics=_jsonable(metrics),
            golden=golden,
            meta={
                "model_name": settings.model_name,
                "training_data_sha256": data_sha256 or products_sha256(products),
                "featurizer_version": FEATURIZER_VERSION,
                "n_train": len(fitted_on),
                "labels": len(label_map),
            },
            signing_key=signing_key,
        )
    except OSError as exc:  # a full disk, a registry removed meanwhile
        raise ConfigError(f"cannot write the bundle into {registry}: {exc}") from exc
    log.info("wrote bundle %s in %.1f s", bundle, time.perf_counter() - t0)
    return bundle


def held_out_metrics(
    scores: np.ndarray,
    products: Sequence[CatalogProduct],
    label_map: LabelMap,
    thresholds: Thresholds,
    *,
    baseline: np.ndarray | None = None,
    full: bool = True,
) -> dict[str, Any]:
    """The evaluation of a model's `scores` [N, T] on labelled `products`, as metrics.json holds it and `tagstream
    evaluate` reports it: `top1` (each exclusive group's top label), `at_thresholds` (top-1, "no tag" below its
    threshold), `served` (the tags serving emits at `thresholds`, every group: `training.evaluate.evaluate_served`)
    and, with the same-run `baseline` scores, the baseline's top-1 figures. In each, a label the model does not know
    (it cannot output it) is a miss, and every group reports `n_unknown`."""
    from training.evaluate import evaluate_served, unknown_labels

    truth = label_map.encode(products)
    unknown = unknown_labels(label_map, products)
    per_tag = {lab.tag: thresholds.for_tag(lab.tag) for lab in label_map.labels}
    out = {
        "top1": evaluate_scores(scores, truth, label_map, full=full, unknown=unknown),
        "at_thresholds": evaluate_scores(scores, truth, label_map, per_tag, full=full, unknown=unknown),
        "served": evaluate_served(scores, truth, label_map, thresholds, unknown=unknown, full=full),
    }
    if baseline is not None:
        out["baseline"] = evaluate_scores(baseline, truth, label_map, full=full, unknown=unknown)
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


# ------------------------------------------------------------------------------------------ evaluation of bundles


def bundle_scores(bundle_dir: str | Path, products: Sequence[Any], *, batch_size: int = 4096) -> tuple[Any, np.ndarray]:
    """(validated ModelBundle, ONNX scores [N, T]) of `products` with the bundle's own featurizer."""
    from serving.bundle import load_bundle
    from serving.scorer import OnnxScorer

    bundle = load_bundle(bundle_dir)
    scorer = OnnxScorer()
    scorer.load(bundle)
    fz = bundle.featurizer
    parts = [scorer.predict(fz.transform(products[s : s + batch_size])) for s in range(0, len(products), batch_size)]
    scores = np.concatenate(parts) if parts else np.zeros((0, bundle.T), np.float32)
    return bundle, scores


def evaluate_bundle(
    bundle_dir: str | Path, products: Sequence[CatalogProduct], *, at_thresholds: bool = False
) -> dict[str, Any]:
    """`{"n", "groups": {group: {n, n_unknown, accuracy, micro_f1, macro_f1, weighted_f1, ...}}, "served": {"n",
    "groups": {group: {SERVED_KEYS}}}}` of a bundle on labelled products.

    `groups`: top-1 per exclusive group (with `at_thresholds`, "no tag" below the shipped threshold). `served`: the
    tags serving emits (`training.evaluate.evaluate_served`), every group, the free `tags` too. A product whose label
    in a group is one the model does not know (and so cannot output) counts as a miss, as in the training report, so
    two bundles evaluated on the same products are scored on the same products in each group they share."""
    products = list(products)
    bundle, scores = bundle_scores(bundle_dir, products)
    label_map = LabelMap.from_json(bundle.labels.to_json())
    metrics = held_out_metrics(scores, products, label_map, bundle.thresholds, full=False)
    return {**metrics["at_thresholds" if at_thresholds else "top1"], "served": metrics["served"]}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (the catalog a CLI run trained on)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
