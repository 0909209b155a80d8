"""Subcommands of the offline side: `train`, `evaluate`, `publish`.

Importing this module (to build the `tagstream` parser) never imports TensorFlow: `train` imports it when it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tagstream.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMATS = ("cn-jd", "myntra", "bigbasket", "jsonl")
HEADLINE = ("accuracy", "micro_f1", "macro_f1", "weighted_f1")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `train`, `evaluate` and `publish` to the `tagstream` command."""
    p = subparsers.add_parser(
        "train",
        help="train a tagger on a catalog and write a model bundle into a registry",
        description="Train on a catalog (stratified train/validation/test split), export to ONNX, check parity, "
        "write a bundle into --out. With --every, retrain periodically and publish a new model only when it is "
        "not worse than the current one on a fixed evaluation set. Settings: TAGSTREAM_* (training/settings.py).",
    )
    p.add_argument("--catalog", type=Path, required=True, help="catalog file")
    p.add_argument("--format", choices=FORMATS, required=True, help="catalog format")
    p.add_argument("--out", type=Path, default=None, help="registry directory (default: TAGSTREAM_MODEL_REGISTRY)")
    p.add_argument("--epochs", type=int, default=None, help="most epochs (default: TAGSTREAM_EPOCHS or 5)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: TAGSTREAM_SEED or 42)")
    p.add_argument(
        "--no-baseline", dest="baseline", action="store_false", help="skip the same-run TF-IDF + linear baseline"
    )
    p.add_argument("--report", default=None, help="report directory (default: OUT/reports/<model version>)")
    p.add_argument("--every", default=None, metavar="DURATION", help="retrain periodically, e.g. 6h, 30m")
    p.add_argument("--kind", choices=("activate", "shadow"), default="activate", help="with --every: publish kind")
    p.add_argument("--cycles", type=int, default=None, help=argparse.SUPPRESS)  # with --every: stop after N
    p.set_defaults(func=run_train)

    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a model bundle on a labelled catalog",
        description="Score every product of the catalog with the bundle (its featurizer + ONNX) and report "
        "accuracy, micro/macro/weighted F1 (top-1) per exclusive tag group.",
    )
    p.add_argument("--model", type=Path, required=True, help="bundle directory")
    p.add_argument("--catalog", type=Path, required=True, help="catalog file")
    p.add_argument("--format", choices=FORMATS, required=True, help="catalog format")
    p.add_argument("--thresholds", action="store_true", help="predict 'no tag' below the shipped thresholds")
    p.add_argument("--json", action="store_true", help='print one JSON object {"n", "groups": {...}}')
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


def _load(path: Path, fmt: str):
    from training.loaders import load_catalog

    result = load_catalog(path, fmt)
    log.info("loaded %d products from %s (%s)", len(result.products), path, fmt)
    return result


def run_train(args: argparse.Namespace) -> int:
    """`tagstream train`."""
    from training.publish import parse_duration
    from training.settings import load_trainer_settings, writable_dir

    settings = load_trainer_settings(epochs=args.epochs, seed=args.seed, baseline=args.baseline)
    every = parse_duration(args.every) if args.every else None
    # everything that would fail only at the end is checked before the catalog is read and a model trained
    registry = writable_dir(args.out or settings.model_registry, "--out" if args.out else "TAGSTREAM_MODEL_REGISTRY")
    if args.report and every is None:
        writable_dir(args.report, "--report")
    settings.signing_key()
    if every is not None:
        from training.publish import periodic_retrain

        records = periodic_retrain(
            lambda: _load(args.catalog, args.format).products,
            settings,
            every_s=every,
            registry=registry,
            kind=args.kind,
            max_cycles=args.cycles,
        )
        print(json.dumps(records, ensure_ascii=False))
        return 0
    from training.train import file_sha256, train

    loaded = _load(args.catalog, args.format)
    bundle = train(
        loaded.products,
        settings,
        registry=registry,
        data_sha256=file_sha256(args.catalog),
        extra_metrics={"data_report": loaded.report.to_dict()},
    )
    metrics = json.loads((bundle / "metrics.json").read_text())
    for g, r in metrics["top1"]["groups"].items():
        base = (metrics.get("baseline") or {}).get("groups", {}).get(g, {})
        line = "  ".join(f"{k}={r.get(k)}" for k in HEADLINE)
        if base:
            line += f"   baseline weighted_f1={base.get('weighted_f1')}"
        print(f"  {g:<16} {line}", file=sys.stderr)
    from training.report import write_report

    report_dir = Path(args.report) if args.report else Path(registry) / "reports" / bundle.name
    try:
        files = write_report(
            report_dir,
            model=metrics["top1"],
            baseline=metrics.get("baseline"),
            data=loaded.report,
            title=f"tagstream training report: {bundle.name}",
            extra={
                **{k: metrics.get(k) for k in ("split", "timings", "parity", "evaluated_on")},
                "at_shipped_thresholds": {
                    g: {k: r.get(k) for k in ("coverage", "micro_f1", "macro_f1", "weighted_f1")}
                    for g, r in metrics["at_thresholds"]["groups"].items()
                },
            },
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot write the report into {report_dir}: {exc} (the bundle is written: {bundle})"
        ) from exc
    print(f"report: {files.html}", file=sys.stderr)
    print(bundle)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """`tagstream evaluate`."""
    from training.evaluate import unevaluated_groups
    from training.train import evaluate_bundle

    if not args.model.is_dir():
        raise ConfigError(f"--model {args.model} is not a bundle directory")
    products = _load(args.catalog, args.format).products
    report = evaluate_bundle(args.model, products, at_thresholds=args.thresholds)
    missing = unevaluated_groups(report)
    if len(missing) == len(report["groups"]):
        raise DataError(
            f"{args.catalog}: none of its {len(products)} products has a label the model knows in any of the model's "
            f"groups ({', '.join(missing) or 'none'}): nothing to evaluate (a catalog of other labels than the "
            "model was trained on?)"
        )
    if missing:
        print(
            f"tagstream evaluate: warning: no product has a label the model knows in {', '.join(missing)}: "
            "not evaluated (figures null)",
            file=sys.stderr,
        )
    out = {
        "n": report["n"],
        "groups": {g: {k: r.get(k) for k in HEADLINE} for g, r in report["groups"].items()},
    }
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
    else:
        print(f"{'group':<18} " + " ".join(f"{k:>11}" for k in HEADLINE) + f"   (n={out['n']})")
        for g, r in out["groups"].items():
            print(f"{g:<18} " + " ".join("         - " if r[k] is None else f"{r[k]:>11.4f}" for k in HEADLINE))
    return 0


def run_publish(args: argparse.Namespace) -> int:
    """`tagstream publish`."""
    from training.publish import publish_bundle
    from training.settings import load_trainer_settings

    event = publish_bundle(args.model, args.kind, load_trainer_settings())
    print(json.dumps(event.to_dict(), ensure_ascii=False))
    return 0
