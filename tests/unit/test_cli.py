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


UNREACHABLE = {"TAGSTREAM_REDIS_URL": "redis://127.0.0.1:1/0", "TAGSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:1"}


def one_error_line(capsys: pytest.CaptureFixture[str], start: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Unclosed" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("tagstream ")]
    assert len(lines) == 1 and lines[0].startswith(start), err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "down", "reason"),
    [
        (["model", "status"], "TAGSTREAM_REDIS_URL", "Redis"),
        (["model", "status", "--json"], "TAGSTREAM_KAFKA_BOOTSTRAP", "could not read"),
        (["model", "rollback", "--wait", "5"], "TAGSTREAM_REDIS_URL", "Redis"),
        (["model", "promote", "--wait", "5"], "TAGSTREAM_KAFKA_BOOTSTRAP", "could not publish"),
    ],
)
def test_model_commands_fail_in_one_line_when_redis_or_kafka_is_unreachable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], down: str, reason: str
) -> None:
    import streams.model_cli

    monkeypatch.setenv(down, UNREACHABLE[down])
    if down != "TAGSTREAM_REDIS_URL":  # Redis answers (no worker known); Kafka is the one down
        monkeypatch.setattr(streams.model_cli, "read_status", lambda settings: {})
    assert main(argv) == 2
    line = one_error_line(capsys, "tagstream model: error: ")
    assert reason in line and "127.0.0.1:1" in line


def test_wait_expects_only_workers_that_reported_lately() -> None:
    from streams.model_cli import STATUS_EVERY_S, live_workers

    now = 1_800_000_000_000
    late = now - int(2 * STATUS_EVERY_S * 1000)  # missed a status write: still running
    status = {"up": {"reported_at": now - 100}, "late": {"reported_at": late}, "gone": {"reported_at": now - 3_600_000}}
    live, stale = live_workers({**status, "never": {"active": None}}, now)
    assert set(live) == {"up", "late"} and set(stale) == {"gone", "never"}


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
