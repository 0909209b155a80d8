"""Subcommands of the offline side: `train`, `evaluate`, `publish`.

Importing this module (to build the `tagstream` parser) never imports TensorFlow: `train` imports it when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from tagstream.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMATS = ("cn-jd", "myntra", "bigbasket", "jsonl")
HEADLINE = ("accuracy", "micro_f1", "macro_f1", "weighted_f1")
SERVED_HEADLINE = ("accuracy", "coverage", "micro_f1", "macro_f1", "weighted_f1")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `train`, `evaluate` and `publish` to the `tagstream` command."""
    p = subparsers.add_parser(
        "train",
        help="train a tagger on a catalog and write a model bundle into a registry",
        description="Train on a catalog (stratified train/validation/test split), export to ONNX, check parity, "
        "write a bundle into --out. With --every, retrain periodically and publish a new model only when it is "
        "not worse, on the products of a fixed evaluation set that neither model trained on, than the model the "
        "workers announce active on model-updates (else the one last published). Settings: TAGSTREAM_* "
        "(training/settings.py).",
    )
    p.add_argument("--catalog", type=Path, required=True, help="catalog file")
    p.add_argument("--format", choices=FORMATS, required=True, help="catalog format")
    p.add_argument("--out", type=Path, default=None, help="registry directory (default: TAGSTREAM_MODEL_REGISTRY)")
    p.add_argument("--epochs", type=int, default=None, help="most epochs (default: TAGSTREAM_EPOCHS or 5)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: TAGSTREAM_SEED or 42)")
    p.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        default=None,
        help="skip the same-run TF-IDF + linear baseline (default: TAGSTREAM_BASELINE, else it is trained)",
    )
    p.add_argument(
        "--report",
        default=None,
        help="report directory (default: OUT/reports/<model version>; with --every, one <model version> "
        "directory inside it per cycle)",
    )
    p.add_argument(
        "--every",
        default=None,
        metavar="DURATION",
        help="retrain periodically, e.g. 6h, 30m (at most 366d); prints one JSON line per cycle",
    )
    p.add_argument("--kind", choices=("activate", "shadow"), help="with --every: publish kind (default activate)")
    p.add_argument(
        "--keep-refused",
        type=int,
        default=None,
        metavar="N",
        help="with --every: keep the newest N candidates the gate refused in this run (default 3; 0 keeps none); "
        "older ones are removed from --out after each cycle, never one published (OUT/published.jsonl), the current "
        "model or one named on model-updates",
    )
    p.add_argument("--cycles", type=int, default=None, help=argparse.SUPPRESS)  # with --every: stop after N
    p.set_defaults(func=run_train)

    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a model bundle on a labelled catalog",
        description="Score every product of the catalog with the bundle (its featurizer + ONNX) and report "
        "accuracy, micro/macro/weighted F1 (top-1) per exclusive tag group, over the products that carry a label "
        "of the group; a label the model does not know (it cannot output it) counts as a miss, and how many "
        "products have one is reported per group (n_unknown). Then the same figures, with coverage, of the tags "
        "serving emits at the shipped thresholds (served), for every group, the free tags too.",
    )
    p.add_argument("--model", type=Path, required=True, help="bundle directory")
    p.add_argument("--catalog", type=Path, required=True, help="catalog file")
    p.add_argument("--format", choices=FORMATS, required=True, help="catalog format")
    p.add_argument("--thresholds", action="store_true", help="predict 'no tag' below the shipped thresholds")
    p.add_argument("--json", action="store_true", help='print one JSON object {"n", "n_unknown", "groups", "served"}')
    p.set_defaults(func=run_evaluate)

    p = subparsers.add_parser(
        "publish",
        help="announce a model bundle on the model-updates topic",
        description="Validate the bundle and send a model-update event (acks=all, idempotent) to "
        "<TAGSTREAM_TOPIC_PREFIX>model-updates at TAGSTREAM_KAFKA_BOOTSTRAP.",
    )
    p.add_argument("--model", type=Path, required=True, help="bundle directory")
    p.add_argument("--kind", choices=("activate", "shadow"), default="activate")
    p.set_defaults(func=run_publish)


def _load(path: Path, fmt: str, command: str, *, every: bool = False):
    """Load a catalog (`training.loaders.load_catalog`); when rows were skipped, one warning line on stderr naming
    the counts by reason (`DataReport.skipped_summary`), and one more when kept products lost attribute labels
    (`labels_dropped_summary`); logged instead in a `--every` cycle."""
    from training.loaders import load_catalog

    _check_catalog(path)
    result = load_catalog(path, fmt)
    log.info("loaded %d products from %s (%s)", len(result.products), path, fmt)
    for line in (result.report.skipped_summary(), result.report.labels_dropped_summary()):
        if line is None:
            continue
        if every:
            log.warning("%s: %s", path, line)
        else:
            print(f"tagstream {command}: warning: {path}: {line}", file=sys.stderr)
    return result


def _check_catalog(path: Path) -> None:
    """DataError (one line) for a catalog path that is no file."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a catalog file")
    if not path.exists():
        raise DataError(f"no such file: {path}")


def _check_output_dir(path: Path, what: str) -> None:
    """`writable_dir`'s checks of an output directory, made without creating it (a ConfigError naming `what`): it is
    created once the catalog has loaded."""
    from training.settings import enclosing_bundle, writable_dir

    if path.exists() or enclosing_bundle(path) is not None:
        writable_dir(path, what)  # it exists (nothing is created) or it is refused before anything is
        return
    ancestor = next((a for a in path.parents if a.exists() or a.is_symlink()), None)
    if ancestor is None or not ancestor.is_dir():
        raise ConfigError(f"{what} {path}: cannot create the directory ({ancestor} is not a directory)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: cannot create the directory ({ancestor} is not writable)")


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM (`docker stop`, a service manager) ends the command as Ctrl-C does, through every `finally` (a
    half-written bundle is removed), with exit status 143; a second SIGTERM kills at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except SystemExit as exc:
        if exc.code == 128 + signal.SIGTERM:
            print("tagstream train: terminated (SIGTERM)", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_report(bundle: Path, report_dir: Path, data: Any, **extra: Any) -> Path:
    """The training report of `bundle` (`training.report.write_report`) into `report_dir`; returns report.html."""
    from training.report import write_report

    metrics = json.loads((bundle / "metrics.json").read_text())
    from training.cleaning import DataReport

    if isinstance(data, DataReport):  # with the label groups the model left out (one label, too little support)
        data.warnings.extend(w for w in metrics.get("label_warnings") or () if w not in data.warnings)
    try:
        files = write_report(
            report_dir,
            model=metrics["top1"],
            baseline=metrics.get("baseline"),
            served=metrics.get("served"),
            data=data,
            title=f"tagstream training report: {bundle.name}",
            extra={**{k: metrics.get(k) for k in ("split", "timings", "parity", "evaluated_on")}, **extra},
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot write the report into {report_dir}: {exc} (the bundle is written: {bundle})"
        ) from exc
    return files.html


def run_train(args: argparse.Namespace) -> int:
    """`tagstream train`."""
    with _sigterm_exits():
        return _run_train(args)


def _run_train(args: argparse.Namespace) -> int:
    from training.publish import KEEP_REFUSED, check_keep_refused, parse_duration
    from training.settings import load_trainer_settings, writable_dir

    settings = load_trainer_settings(epochs=args.epochs, seed=args.seed, baseline=args.baseline)
    if args.baseline is None and "baseline" not in settings.model_fields_set:  # neither the flag nor the variable
        settings = settings.model_copy(update={"baseline": True})
    every = parse_duration(args.every) if args.every is not None else None
    if args.keep_refused is not None and every is None:
        raise ConfigError("--keep-refused goes with --every (a single run refuses no candidate)")
    if args.kind is not None and every is None:
        raise ConfigError("--kind goes with --every (a single run publishes nothing: `tagstream publish --kind`)")
    keep_refused = check_keep_refused(KEEP_REFUSED if args.keep_refused is None else args.keep_refused)
    # everything that would fail only at the end is checked before the catalog is read and a model trained; the
    # output directories are created only once the catalog has loaded, so a command refused on its input leaves none
    registry = Path(args.out or settings.model_registry)
    outputs = [(registry, "--out" if args.out else "TAGSTREAM_MODEL_REGISTRY")]
    if args.report:
        outputs.append((Path(args.report), "--report"))
    for path, what in outputs:
        _check_output_dir(path, what)
    settings.signing_key()
    _check_catalog(args.catalog)
    if every is not None:
        from training.publish import check_publishing, periodic_retrain

        check_publishing(settings)
        for path, what in outputs:  # each cycle reads the catalog anew: a bad one fails that cycle only
            writable_dir(path, what)
        loaded: dict[str, Any] = {}

        def load() -> list[Any]:
            loaded["result"] = result = _load(args.catalog, args.format, "train", every=True)
            return result.products

        def on_decision(record: dict[str, Any]) -> None:
            # like a single run: a report per bundle (OUT/reports/<version>, or --report/<version>), written before
            # a refused bundle may be removed
            if "bundle" in record and "result" in loaded:
                bundle = Path(record["bundle"])
                report_dir = Path(args.report or Path(registry) / "reports") / bundle.name
                keys = ("cycle", "current", "current_from", "gate", "publish", "reasons", "error")
                retrain = {k: record.get(k) for k in keys}
                try:
                    html = _write_report(bundle, report_dir, loaded["result"].report, retrain=retrain)
                    record["report"] = str(html)
                except (ConfigError, OSError, ValueError, KeyError) as exc:
                    record["report_error"] = str(exc)
                    log.error("retrain cycle %d: no report: %s", record["cycle"], exc)

        def on_cycle(record: dict[str, Any]) -> None:
            print(json.dumps(record, ensure_ascii=False), flush=True)  # one line per cycle, as it ends

        periodic_retrain(
            load,
            settings,
            every_s=every,
            registry=registry,
            kind=args.kind or "activate",
            max_cycles=args.cycles,
            keep_refused=keep_refused,
            on_decision=on_decision,
            on_cycle=on_cycle,
        )
        return 0
    from training.train import file_sha256, train

    loaded_once = _load(args.catalog, args.format, "train")
    for path, what in outputs:
        writable_dir(path, what)
    bundle = train(
        loaded_once.products,
        settings,
        registry=registry,
        data_sha256=file_sha256(args.catalog),
        extra_metrics={"data_report": loaded_once.report.to_dict()},
    )
    metrics = json.loads((bundle / "metrics.json").read_text())
    for g, r in metrics["top1"]["groups"].items():
        base = (metrics.get("baseline") or {}).get("groups", {}).get(g, {})
        line = "  ".join(f"{k}={r.get(k)}" for k in HEADLINE)
        if base:
            line += f"   baseline weighted_f1={base.get('weighted_f1')}"
        print(f"  {g:<16} {line}", file=sys.stderr)
    report_dir = Path(args.report) if args.report else Path(registry) / "reports" / bundle.name
    html = _write_report(bundle, report_dir, loaded_once.report)
    print(f"report: {html}", file=sys.stderr)
    held_out = _write_held_out(loaded_once.products, settings, report_dir)
    print(
        f"held-out products: {held_out} (`tagstream evaluate --model {bundle} --catalog {held_out} --format jsonl` "
        "gives the report's figures)",
        file=sys.stderr,
    )
    print(bundle)
    return 0


def _write_held_out(products: list[Any], settings: Any, report_dir: Path) -> Path:
    """The products the report evaluated on (the run's test part: `training.splits.holdout_split`, as `train` split
    them) as canonical JSONL, `report_dir/test.jsonl`, so that `tagstream evaluate` reproduces its figures."""
    from tagstream.synth import write_jsonl
    from training.splits import holdout_split

    split = holdout_split(
        products, validation=settings.validation_fraction, test=settings.test_fraction, seed=settings.seed
    )
    path = report_dir / "test.jsonl"
    try:
        write_jsonl(split.test or split.validation, path)  # `train` evaluates on validation when there is no test
    except OSError as exc:
        raise ConfigError(f"cannot write the held-out products into {report_dir}: {exc}") from exc
    return path


def run_evaluate(args: argparse.Namespace) -> int:
    """`tagstream evaluate`."""
    from training.evaluate import unevaluated_groups
    from training.labels import product_labels
    from training.train import evaluate_bundle

    if not args.model.is_dir():
        raise ConfigError(f"--model {args.model} is not a bundle directory")
    products = _load(args.catalog, args.format, "evaluate").products
    if not any(product_labels(p) for p in products):
        raise DataError(
            f"{args.catalog}: the catalog has no labels: none of its {len(products)} products has a category path, "
            "an attribute or a free tag (in JSONL the keys category_path, attributes and tags): nothing to evaluate"
        )
    report = evaluate_bundle(args.model, products, at_thresholds=args.thresholds)
    if seen := _trained_on(args.model, products):
        print(
            f"tagstream evaluate: warning: {seen:,} of {len(products):,} products were in the model's training data: "
            "the figures are optimistic",
            file=sys.stderr,
        )
    missing = unevaluated_groups(report)
    multi = _multi_groups(args.model)
    missing_tags = _free_tags_unevaluated(multi, report)
    if len(missing) == len(report["groups"]) and len(missing_tags) == len(multi):
        raise DataError(
            f"{args.catalog}: none of its {len(products)} products has a label the model knows in any of the model's "
            f"groups ({', '.join(missing + missing_tags) or 'none'}): nothing to evaluate (a catalog of other labels "
            "than the model was trained on?)"
        )
    if missing:
        print(
            f"tagstream evaluate: warning: no product has a label the model knows in {', '.join(missing)}: "
            "not evaluated (figures null)",
            file=sys.stderr,
        )
    served_only = {g: r for g, r in report["served"]["groups"].items() if g not in report["groups"]}  # free tags
    unknown = [
        f"{g} {r['n_unknown']} of {r['n']}"
        for g, r in {**report["groups"], **served_only}.items()
        if r.get("n") and r.get("n_unknown")
    ]
    if unknown:
        print(
            "tagstream evaluate: warning: products whose label the model does not know (it cannot output it), "
            f"counted as misses: {', '.join(unknown)}",
            file=sys.stderr,
        )
    out = {
        "n": len(products),  # the top-1 report's own n is 0 for a model of free tags only (no exclusive group)
        "n_unknown": {g: r["n_unknown"] for g, r in report["groups"].items()},
        "groups": {g: {k: r.get(k) for k in HEADLINE} for g, r in report["groups"].items()},
        "served": report["served"]["groups"],
    }
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
    else:
        print(f"{'group':<18} " + " ".join(f"{k:>11}" for k in HEADLINE) + f" {'n':>8} {'unknown':>8}")
        for g, r in report["groups"].items():
            figures = " ".join("         - " if r.get(k) is None else f"{r[k]:>11.4f}" for k in HEADLINE)
            print(f"{g:<18} {figures} {r['n']:>8} {r['n_unknown']:>8}")
        print("served (the tags serving emits at the shipped thresholds; no tag emitted is a miss):")
        print(f"{'group':<18} " + " ".join(f"{k:>11}" for k in SERVED_HEADLINE) + f" {'n':>8} {'unknown':>8}")
        for g, r in report["served"]["groups"].items():
            figures = " ".join("         - " if r.get(k) is None else f"{r[k]:>11.4f}" for k in SERVED_HEADLINE)
            print(f"{g:<18} {figures} {r['n']:>8} {r['n_unknown']:>8}")
        print(f"({out['n']} products)")
    return 0


def _trained_on(bundle: Path, products: list[Any]) -> int:
    """How many of `products` the bundle trained on (its metrics.json `trained_on`: train and validation products,
    by normalised title); 0 when it keeps no such record."""
    from training.publish import bundle_trained_on
    from training.splits import trained_on_key

    seen = bundle_trained_on(bundle)
    return 0 if not seen else sum(trained_on_key(p) in seen for p in products)


def _multi_groups(bundle: Path) -> dict[str, set[str]]:
    """The multi-label groups (the free `tags`) of a bundle that loaded, with their tags."""
    labels = json.loads((bundle / "labels.json").read_bytes())
    multi = {g["name"] for g in labels["groups"] if g["kind"] == "multi"}
    return {g: {lab["tag"] for lab in labels["labels"] if lab["group"] == g} for g in multi}


def _free_tags_unevaluated(multi: dict[str, set[str]], report: dict[str, Any]) -> list[str]:
    """The multi-label groups (`_multi_groups`) in which no product carries a tag the model knows: their `served`
    figures count only tags it cannot emit, or none."""
    served = report["served"]["groups"]
    return sorted(
        g
        for g, tags in multi.items()
        if not any(t in tags and r.get("support") for t, r in (served.get(g, {}).get("per_tag") or {}).items())
    )


def run_publish(args: argparse.Namespace) -> int:
    """`tagstream publish`."""
    from training.publish import publish_bundle
    from training.settings import load_trainer_settings

    event = publish_bundle(args.model, args.kind, load_trainer_settings())
    print(json.dumps(event.to_dict(), ensure_ascii=False))
    return 0
