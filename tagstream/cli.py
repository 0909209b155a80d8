"""The `tagstream` console command: one entry point with a subcommand for everything a user runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable

from tagstream.errors import TagstreamError

# Each module contributes its subcommands through `register(subparsers)`; none of them imports TensorFlow at import
# time (training imports it inside its commands), so `tagstream worker` never loads it.
COMMAND_MODULES = (
    "tagstream.stack",  # stack up | down | status
    "streams.cli",  # worker, topics, replay, tail, redrive
    "streams.model_cli",  # model status | rollback | promote
    "serving.cli",  # lookup (HTTP tag lookup)
    "training.cli",  # train, evaluate, publish
    "tagstream.demo",  # demo
    "tagstream.bench",  # bench
)


def int_at_least(low: int, why: str = "") -> Callable[[str], int]:
    """argparse type of an integer option that must be at least `low` (`why` is said when it is not)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be ≥ {low}{why}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every module's subcommands."""
    parser = argparse.ArgumentParser(prog="tagstream", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # only a broken install lacks one; tests import every module
            if exc.name != module_name:
                raise
            logging.getLogger(__name__).warning("subcommands of %s unavailable: %s", module_name, exc)
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a TagstreamError prints one clear line and exits 2, Ctrl-C one line and exits 130, a
    reader that closed the output pipe (`| head`) nothing and exits 141."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose and args.command != "worker":  # a worker's log keeps the client's joins and assignments
        logging.getLogger("aiokafka").setLevel(logging.WARNING)  # `tail ... 2>&1`: records, not client chatter
    try:
        return int(args.func(args) or 0)
    except TagstreamError as exc:
        print(f"tagstream {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # after every `finally` on the way (a half-written bundle is gone)
        print(f"tagstream {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tagstream tail ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        return 141  # as a command a SIGPIPE stopped (128 + 13)


if __name__ == "__main__":
    sys.exit(main())
