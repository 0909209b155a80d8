"""Linear TF-IDF baseline: character n-gram TF-IDF + LinearSVC per tag group, reported like the model.

- Text: `normalize_text(title [+ brand])`, `TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3),
  sublinear_tf=True, min_df=2, max_features=200k)`.
- Groups: `category_l1` and `category_l2` are flat one-vs-rest LinearSVCs; `category_leaf` is top-down:
  P(leaf) = P(L2) · P(leaf | L2) with one small LinearSVC per L2 on that L2's rows (same accuracy as a flat
  leaf classifier on JD, ~10× faster: ~700 flat classes take minutes on 2 cores). Each attribute (e.g. `colour`)
  is a flat LinearSVC over the products that have it.
- Scores are pseudo-probabilities: softmax(decision / temperature), temperature 0.25 (not tuned; calibration plots
  of the baseline are indicative only). Predictions are the argmax (no threshold → coverage 1.0).

`run_baseline(train, test)` returns the `evaluate_groups` report plus `"model"` (configuration, train seconds).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.svm import LinearSVC

from training.catalog import CatalogProduct
from training.cleaning import normalize_text
from training.evaluate import GroupPredictions, evaluate_groups
from training.labels import attribute_group, attribute_tag, category_tags

__all__ = [
    "BaselineConfig",
    "BaselineJob",
    "BaselineModel",
    "baseline_scores",
    "fit_baseline",
    "group_tag_functions",
    "run_baseline",
]

TagFn = Callable[[CatalogProduct], str | None]


@dataclass(frozen=True)
class BaselineConfig:
    """Hyper-parameters of the baseline (fixed, not tuned on test)."""

    ngram_range: tuple[int, int] = (1, 3)
    min_df: int = 2
    max_features: int = 200_000
    C: float = 0.5
    temperature: float = 0.25
    use_brand: bool = True
    seed: int = 0


def _level_tag(depth: int) -> TagFn:
    def tag(p: CatalogProduct) -> str | None:
        tags = category_tags(p.category_path)
        return tags[depth - 1] if len(tags) >= depth else None

    return tag


def _attr_tag(name: str) -> TagFn:
    def tag(p: CatalogProduct) -> str | None:
        v = p.attributes.get(name)
        return attribute_tag(name, v) if v else None

    return tag


def group_tag_functions(products: Sequence[CatalogProduct]) -> dict[str, TagFn]:
    """The exclusive groups found in `products`: category levels (l1, l2, leaf = level 3) and each attribute."""
    depth = max((len(p.category_path) for p in products), default=0)
    out: dict[str, TagFn] = {}
    if depth >= 1:
        out["category_l1"] = _level_tag(1)
    if depth >= 2:
        out["category_l2"] = _level_tag(2)
    if depth >= 3:
        out["category_leaf"] = _level_tag(3)
    for name in sorted({k for p in products for k in p.attributes}):
        out[attribute_group(name)] = _attr_tag(name)
    return out


def _softmax(d: np.ndarray, t: float) -> np.ndarray:
    z = d / t
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class _Flat:
    labels: list[str]
    clf: LinearSVC | None  # None: a single label

    def proba(self, x: sparse.csr_matrix, t: float) -> np.ndarray:
        if self.clf is None:
            return np.ones((x.shape[0], 1))
        d = self.clf.decision_function(x)
        if d.ndim == 1:
            d = np.column_stack([-d, d])
        return _softmax(d, t)


def _fit_flat(x: sparse.csr_matrix, y: Sequence[str], cfg: BaselineConfig) -> _Flat:
    labels = sorted(set(y))
    if len(labels) == 1:
        return _Flat(labels, None)
    clf = LinearSVC(C=cfg.C, random_state=cfg.seed)
    clf.fit(x, _encode(y, labels))
    return _Flat(labels, clf)


def _encode(y: Sequence[str], labels: list[str]) -> np.ndarray:
    pos = {v: i for i, v in enumerate(labels)}
    return np.array([pos[v] for v in y])


@dataclass
class BaselineModel:
    """A fitted baseline: the vectorizer and one classifier per group."""

    config: BaselineConfig
    vectorizer: TfidfVectorizer
    tag_fns: dict[str, TagFn]
    flat: dict[str, _Flat] = field(default_factory=dict)
    leaf_by_l2: dict[str, _Flat] = field(default_factory=dict)

    def _text(self, p: CatalogProduct) -> str:
        brand = p.brand if self.config.use_brand and p.brand else ""
        return normalize_text(f"{p.title} {brand}")

    def transform(self, products: Sequence[CatalogProduct]) -> sparse.csr_matrix:
        """TF-IDF rows of the products."""
        return self.vectorizer.transform([self._text(p) for p in products])

    def scores(self, products: Sequence[CatalogProduct]) -> dict[str, tuple[list[str], np.ndarray]]:
        """Per group: (tag names, pseudo-probabilities [N, K])."""
        x = self.transform(products)
        t = self.config.temperature
        out = {name: (f.labels, f.proba(x, t)) for name, f in self.flat.items()}
        if self.leaf_by_l2 and "category_l2" in out:
            l2_labels, p2 = out["category_l2"]
            labels: list[str] = []
            cols: list[np.ndarray] = []
            for j, l2 in enumerate(l2_labels):
                sub = self.leaf_by_l2.get(l2)
                if sub is None:
                    continue
                labels += sub.labels
                cols.append(p2[:, [j]] * sub.proba(x, t))
            out["category_leaf"] = (labels, np.hstack(cols) if cols else np.zeros((x.shape[0], 0)))
        return {name: out[name] for name in self.tag_fns if name in out}

    def predict_groups(self, products: Sequence[CatalogProduct]) -> dict[str, GroupPredictions]:
        """`GroupPredictions` per group against the products' own labels (unseen tags become extra columns)."""
        groups: dict[str, GroupPredictions] = {}
        for name, (labels, s) in self.scores(products).items():
            fn = self.tag_fns[name]
            names = list(labels)
            pos = {v: i for i, v in enumerate(names)}
            y_true = []
            for p in products:
                tag = fn(p)
                if tag is not None and tag not in pos:
                    pos[tag] = len(names)
                    names.append(tag)
                y_true.append(-1 if tag is None else pos[tag])
            if len(names) > s.shape[1]:
                s = np.hstack([s, np.zeros((s.shape[0], len(names) - s.shape[1]))])
            groups[name] = GroupPredictions.from_scores(np.array(y_true), s, names)
        return groups


def fit_baseline(train: Sequence[CatalogProduct], config: BaselineConfig | None = None) -> BaselineModel:
    """Fit the vectorizer and the per-group classifiers on `train`."""
    cfg = config or BaselineConfig()
    vec = TfidfVectorizer(
        analyzer="char_wb",
        ngram_range=cfg.ngram_range,
        sublinear_tf=True,
        min_df=cfg.min_df,
        max_features=cfg.max_features,
        dtype=np.float32,
    )
    model = BaselineModel(cfg, vec, group_tag_functions(train))
    x = vec.fit_transform([model._text(p) for p in train])
    for name, fn in model.tag_fns.items():
        tags = [fn(p) for p in train]
        rows = np.array([i for i, t in enumerate(tags) if t is not None])
        if len(rows) == 0:
            continue
        y = [tags[i] for i in rows]
        if name == "category_leaf" and "category_l2" in model.tag_fns:
            l2 = [model.tag_fns["category_l2"](train[i]) for i in rows]
            for parent in sorted(set(l2)):  # type: ignore[type-var]
                sel = np.array([k for k, v in enumerate(l2) if v == parent])
                model.leaf_by_l2[parent] = _fit_flat(x[rows[sel]], [y[k] for k in sel], cfg)  # type: ignore[index]
        else:
            model.flat[name] = _fit_flat(x[rows], y, cfg)  # type: ignore[arg-type]
    return model


def run_baseline(
    train: Sequence[CatalogProduct], test: Sequence[CatalogProduct], config: BaselineConfig | None = None
) -> dict[str, Any]:
    """Fit on `train`, evaluate on `test`: the `evaluate_groups` report plus `"model"` (config, timings)."""
    cfg = config or BaselineConfig()
    t0 = time.perf_counter()
    model = fit_baseline(train, cfg)
    t1 = time.perf_counter()
    report = evaluate_groups(model.predict_groups(test))
    report["model"] = {
        "name": "tfidf-char-linearsvc",
        "config": asdict(cfg),
        "n_train": len(train),
        "n_features": len(model.vectorizer.vocabulary_),
        "train_seconds": round(t1 - t0, 2),
        "eval_seconds": round(time.perf_counter() - t1, 2),
    }
    return report


def baseline_scores(
    train: Sequence[CatalogProduct],
    products: Sequence[CatalogProduct],
    label_map: Any,
    config: BaselineConfig | None = None,
) -> np.ndarray:
    """Fit on `train` and score `products` in the column layout of `label_map` (a `training.labels.LabelMap`).

    Returns float32 [N, T]: for each exclusive group of the label map, the baseline's pseudo-probabilities of the
    same tags (0 for tags the baseline did not see); multi-label groups stay 0.
    """
    model = fit_baseline(train, config)
    out = np.zeros((len(products), len(label_map.labels)), dtype=np.float32)
    kinds = {g.name: g.kind for g in label_map.groups}
    for name, (labels, s) in model.scores(products).items():
        if kinds.get(name) != "exclusive":
            continue
        for j, tag in enumerate(labels):
            try:
                col = label_map.index(tag)
            except KeyError:
                continue
            if label_map.labels[col].group == name:
                out[:, col] = s[:, j]
    return out


def _serve_scores(parent_pid: int, niceness: int) -> None:
    """The child process of a `BaselineJob` (`python -c`): reads (train, products, label_map) pickled on stdin, writes
    ("ok", scores, "") or ("error", exception, traceback) pickled on stdout. Anything else written to stdout goes to
    stderr, the child runs `niceness` below the trainer's priority and ends with the trainer `parent_pid`."""
    import pickle
    import sys
    import traceback

    from tagstream.processes import background_child

    background_child(parent_pid, niceness)
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a library's print cannot corrupt the answer
    sys.stdout = sys.stderr
    try:
        train, products, label_map = pickle.load(sys.stdin.buffer)
        answer: tuple[str, Any, str] = ("ok", baseline_scores(train, products, label_map), "")
    except Exception as exc:
        answer = ("error", exc, traceback.format_exc())
    try:
        data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # an exception that does not pickle: its text
        data = pickle.dumps(("error", RuntimeError(repr(answer[1])), answer[2]))
    with answers:
        answers.write(data)


class BaselineJob:
    """`baseline_scores` in a process of its own, started before the model's fit and collected after it.

    The fit (TensorFlow) keeps about 1.3 of 2 cores busy; the baseline (~40 s on JD, one core) runs beside it
    instead of after it, at `niceness` (default 19): on the CPU the fit leaves idle, not on a core one of
    TensorFlow's two threads is waiting for (an op split over both threads ends with its slower half). The child is
    a plain `python -c` process fed through its stdin and stdout, not a multiprocessing one: that would import the
    caller's `__main__` again (a script without a main guard would train in the child too). Ctrl-C is the trainer's
    to handle (the child has a process group of its own and is killed by `cancel()`).
    `result()` returns the scores or raises the baseline's own error (its traceback in the child as a note), or
    `BaselineProcessError` when the child ended without an answer.
    """

    def __init__(
        self, train: Sequence[CatalogProduct], products: Sequence[CatalogProduct], label_map: Any, *, niceness: int = 19
    ) -> None:
        import subprocess
        import sys
        import threading

        code = f"from training.baseline import _serve_scores; _serve_scores({os.getpid()}, {int(niceness)})"
        path = os.pathsep.join(p for p in sys.path if p)  # what this process imports from, scripts' paths included
        self._process = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": path},
            process_group=0,  # a terminal's Ctrl-C is the trainer's to handle: it cancels the child
        )
        self._cancelled = False
        payload = (list(train), list(products), label_map)
        self._sender = threading.Thread(target=self._send, args=(payload,), name="baseline-input", daemon=True)
        self._sender.start()

    def _send(self, payload: Any) -> None:
        import pickle

        stdin = self._process.stdin
        assert stdin is not None
        try:
            with stdin:
                pickle.dump(payload, stdin, protocol=pickle.HIGHEST_PROTOCOL)
        except (OSError, ValueError):  # the child is gone (or cancelled): result() says so
            pass

    @property
    def running(self) -> bool:
        """Whether the baseline's process is still running."""
        return self._process.poll() is None

    def result(self) -> np.ndarray:
        """The baseline's scores (waits for them)."""
        import pickle

        from tagstream.errors import BaselineProcessError

        stdout = self._process.stdout
        if self._cancelled or stdout is None:
            raise BaselineProcessError("the baseline process was cancelled")
        try:
            with stdout:
                status, value, trace = pickle.load(stdout)
        except (EOFError, OSError, pickle.UnpicklingError, ValueError):
            code = self._process.wait()
            raise BaselineProcessError(f"the baseline process ended without scores (exit code {code})") from None
        finally:
            self._sender.join()
        self._process.wait()
        if status == "error":
            value.add_note(f"in the baseline process:\n{trace}")
            raise value
        return value

    def cancel(self) -> None:
        """Stop the baseline (the fit failed or was interrupted)."""
        self._cancelled = True
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._sender.join()
        if self._process.stdout is not None:
            self._process.stdout.close()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m training.baseline --catalog FILE --format FMT [--split stratified|source] [--out DIR]`."""
    import argparse
    import json

    from training.loaders import LOADERS, load_catalog
    from training.splits import group_split, stratified_split

    ap = argparse.ArgumentParser(prog="python -m training.baseline", description=main.__doc__)
    ap.add_argument("--catalog", type=str, required=True)
    ap.add_argument("--format", choices=sorted(LOADERS), required=True)
    ap.add_argument("--split", choices=("stratified", "source"), default="stratified")
    ap.add_argument("--test", type=float, default=0.2, help="test fraction (no validation part: 80/20 by default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=str, default=None, help="write report.json/report.html here")
    args = ap.parse_args(argv)
    loaded = load_catalog(args.catalog, args.format)
    split_fn = stratified_split if args.split == "stratified" else group_split
    sp = split_fn(loaded.products, validation=0.0, test=args.test, seed=args.seed)
    rep = run_baseline(sp.train, sp.test)
    print(loaded.report.to_markdown())
    print(f"split {args.split}: {sp.sizes()}; baseline trained in {rep['model']['train_seconds']} s")
    print(f"{'group':<16}{'n':>7}{'labels':>8}{'acc':>8}{'micro_f1':>10}{'macro_f1':>10}{'weighted_f1':>13}")
    for name, g in rep["groups"].items():
        print(
            f"{name:<16}{g['n']:>7}{g['n_labels']:>8}{g['accuracy']:>8.3f}{g['micro_f1']:>10.3f}"
            f"{g['macro_f1']:>10.3f}{g['weighted_f1']:>13.3f}"
        )
    if args.out:
        from training.report import write_report

        files = write_report(
            args.out, baseline=rep, data=loaded.report, extra={"split": args.split, "sizes": sp.sizes()}
        )
        print(f"wrote {files.html}")
    else:
        json.dumps(rep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
