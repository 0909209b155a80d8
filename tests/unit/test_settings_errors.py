"""Bad settings of the worker's commands: one line naming the setting and exit 2, never a traceback (no services)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tagstream.cli import main

COMMANDS = [["topics"], ["tail", "tag-updates"], ["replay", "events.jsonl", "--topic", "products"]]


@pytest.mark.parametrize(
    ("name", "value", "named"),
    [
        ("TAGSTREAM_BATCH_MAX", "0", "batch_max"),  # out of range
        ("TAGSTREAM_GC_THRESHOLDS", "10000,10,10", "TAGSTREAM_GC_THRESHOLDS"),  # a list setting that is not JSON
    ],
)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_worker_setting_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    name: str,
    value: str,
    named: str,
    command: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "events.jsonl").write_text("{}\n")
    monkeypatch.setenv(name, value)
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tagstream {command[0]}: error: invalid worker settings") and named in err
    assert "\n" not in err and "Traceback" not in err
