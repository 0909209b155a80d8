"""The one console command: every subcommand is there, and the serving path never loads TensorFlow."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tagstream.cli import COMMAND_MODULES, build_parser, main

EXPECTED = {
    "stack",
    "worker",
    "topics",
    "replay",
    "tail",
    "lookup",
    "train",
    "evaluate",
    "publish",
    "model",
    "demo",
    "bench",
}


def test_every_command_module_imports_and_registers_its_subcommands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        assert hasattr(importlib.import_module(name), "register"), name
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert commands >= EXPECTED


def test_a_tagstream_error_is_one_clear_line_and_exit_2(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    code = main(["replay", str(tmp_path / "missing.jsonl"), "--topic", "products"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tagstream replay: error: no such file")


def test_the_serving_path_never_imports_tensorflow() -> None:
    code = (
        "import sys, tagstream.cli, streams.app, streams.model, streams.processor, serving.http, serving.cli\n"
        "tagstream.cli.build_parser()\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_latency_fractions_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    from tagstream.bench import _fractions

    assert _fractions("0.1,0.25") == (0.1, 0.25) and _fractions("") == ()
    for bad in ("0.1,x", "0", "1.5"):
        with pytest.raises(SystemExit):
            main(["bench", "--latency-fractions", bad])
        assert "--latency-fractions" in capsys.readouterr().err
