"""The one console command: every subcommand is there, and the serving path never loads TensorFlow."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from types import SimpleNamespace

import orjson
import pytest

from tagstream.cli import COMMAND_MODULES, build_parser, main

EXPECTED = {
    "stack",
    "worker",
    "topics",
    "replay",
    "tail",
    "redrive",
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
    assert main(["replay", str(tmp_path), "--topic", "products"]) == 2  # a directory is there, but is no file
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"tagstream replay: error: not a regular file: {tmp_path}"


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


# ------------------------------------------------------------------- bad input: one line, exit 2, never a traceback

DOWN = "127.0.0.1:1"  # nothing listens: Kafka "unreachable" at once


def only_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    """The whole of stderr: one `tagstream <command>: error: ...` line, no traceback, no unclosed-client warning."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Unclosed" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tagstream {command}: error: "), err
    return lines[0]


@pytest.fixture
def kafka_down(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Kafka unreachable (so nothing here can reach the shared broker), the asyncio loop (no uvloop policy left
    behind by `worker`), and a scratch Faust data dir."""
    monkeypatch.setenv("TAGSTREAM_KAFKA_BOOTSTRAP", DOWN)
    monkeypatch.setenv("TAGSTREAM_EVENT_LOOP", "asyncio")
    monkeypatch.setenv("TAGSTREAM_DATA_DIR", str(tmp_path / "faust"))
    monkeypatch.delenv("TAGSTREAM_MODEL_PATH", raising=False)


@pytest.mark.usefixtures("kafka_down")
@pytest.mark.parametrize("how", ["--model", "TAGSTREAM_MODEL_PATH"])
def test_worker_refuses_a_model_path_that_is_no_bundle_before_faust_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path, how: str
) -> None:
    from tests.tinymodel import make_bundle

    registry = tmp_path / "registry"
    bundle = make_bundle(registry)
    for path, named in ((tmp_path / "nope", "no such directory"), (registry, f"such as {bundle}")):
        argv = ["worker", "--model", str(path)] if how == "--model" else ["worker"]
        monkeypatch.setenv("TAGSTREAM_MODEL_PATH", str(path))
        assert main(argv) == 2
        line = only_error_line(capsys, "worker")
        assert f"error: {path}: not a" in line and named in line


@pytest.mark.usefixtures("kafka_down")
@pytest.mark.parametrize(
    ("argv", "action"),
    [
        (["topics"], "could not create topics at"),
        (["replay", "events.jsonl", "--topic", "products"], "could not read the message size limit of products at"),
        (["tail", "tag-updates", "-n", "1"], "could not read tag-updates at"),
        (["worker"], "could not create topics at"),
    ],
)
def test_kafka_unreachable_is_one_line_naming_the_bootstrap(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path, argv: list[str], action: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "events.jsonl").write_text('{"product_id": "p1"}\n')
    assert main(argv) == 2
    line = only_error_line(capsys, argv[0])
    assert f"{action} {DOWN}: " in line and "is Kafka running there?" in line


@pytest.mark.usefixtures("kafka_down")
@pytest.mark.parametrize("n", ["0", "-1"])
def test_tail_refuses_a_limit_below_one(capsys: pytest.CaptureFixture[str], n: str) -> None:
    assert main(["tail", "tag-updates", "-n", n]) == 2
    assert f"-n/--limit must be at least 1, got {n}" in only_error_line(capsys, "tail")


def test_lookup_on_a_taken_port_is_one_line_naming_the_address(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    monkeypatch.setenv("TAGSTREAM_REDIS_URL", "redis://127.0.0.1:1/0")  # never connected: the bind fails first
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["lookup", "--port", str(port)]) == 2
    line = only_error_line(capsys, "lookup")
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in line


@pytest.mark.parametrize("command", [["publish"], ["model", "activate"]])
def test_publishing_a_registry_names_it_and_a_bundle_in_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path, command: list[str]
) -> None:
    from tests.tinymodel import make_bundle

    monkeypatch.setenv("TAGSTREAM_KAFKA_BOOTSTRAP", DOWN)  # refused before any send
    registry = tmp_path / "registry"
    bundle = make_bundle(registry)
    assert main([*command, "--model", str(registry)]) == 2
    line = only_error_line(capsys, command[0])
    assert f"{registry}: not a model bundle (manifest.json missing); pass a bundle directory such as {bundle}" in line


# ------------------------------------------------------------------- replay: every line checked before anything is sent


def _upsert_line(pid: str, title: str = "Roadster Men Blue Jeans") -> bytes:
    import orjson

    from tests.events import upsert

    return orjson.dumps(upsert(pid, title))


@pytest.fixture
def replay_offline(monkeypatch: pytest.MonkeyPatch, kafka_down: None) -> None:
    """`replay` with the topics taken as existing at the producer's size limit: Kafka stays unreachable, so a file
    that got as far as sending would fail with `could not send`."""
    import streams.cli

    async def limit(settings: object, topic: str) -> int:
        return streams.cli.REPLAY_MAX_REQUEST_BYTES

    monkeypatch.setattr(streams.cli, "_ensure_topics", lambda settings: [])
    monkeypatch.setattr(streams.cli, "_message_limit", limit, raising=False)


@pytest.mark.usefixtures("replay_offline")
@pytest.mark.parametrize("send_invalid", [False, True])
def test_replay_refuses_a_file_with_a_line_over_the_size_limit_before_sending_anything(
    capsys: pytest.CaptureFixture[str], tmp_path, send_invalid: bool
) -> None:
    path = tmp_path / "big.jsonl"
    lines = [_upsert_line("jd-a"), _upsert_line("jd-big", "x" * 2_000_000), b'{"product_id": "jd-x"}', b""]
    path.write_bytes(b"\n".join([*lines, _upsert_line("jd-b")]) + b"\n")
    assert main(["replay", str(path), "--topic", "products", *(["--send-invalid"] * send_invalid)]) == 2
    line = only_error_line(capsys, "replay")
    assert f"error: {path}:2: 2000" in line and "over the 1048576-byte limit" in line
    assert "bad lines: 1 over the size limit, 1 invalid, of 4; nothing sent" in line
    assert "a line over the size limit can never be sent" in line if send_invalid else "--send-invalid" in line


@pytest.mark.usefixtures("replay_offline")
def test_replay_refuses_a_file_that_is_not_jsonl_naming_the_first_bad_line_and_the_count(
    capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    path = tmp_path / "UserBehavior.csv"
    path.write_text("1,2268318,2520377,pv,1511544070\n1,2333346,2520771,pv,1511561733\n")
    assert main(["replay", str(path), "--topic", "behavior"]) == 2
    line = only_error_line(capsys, "replay")
    assert f"error: {path}:1: click: not JSON" in line and "0 over the size limit, 2 invalid, of 2" in line


@pytest.mark.usefixtures("replay_offline")
def test_replay_names_a_huge_bad_line_in_a_short_error_line(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    # the error quoted every unknown key: a 700 KB line printed a 2.8-million-character error line
    event = {"schema_version": 1, "event_type": "view", "product_id": "p", "user_id": "u", "ts": 1764316805123}
    path = tmp_path / "bad.jsonl"
    path.write_bytes(orjson.dumps({**event, **{"\x7f" * 60 + str(i): 1 for i in range(10_000)}}) + b"\n")
    assert path.stat().st_size > 600_000
    assert main(["replay", str(path), "--topic", "behavior"]) == 2
    line = only_error_line(capsys, "replay")
    assert f"{path}:1: click: data has the unknown keys" in line and "and 9997 more" in line and len(line) < 1000


def test_tail_prints_each_message_on_one_line() -> None:
    from streams.cli import _show

    assert _show(b'{\n  "product_id": "p1",\r\n  "n": 1\n}') == '{"product_id":"p1","n":1}'  # pretty JSON, compact
    assert _show(b"not\njson\r") == "not\\njson\\r"  # no JSON: its breaks escaped
    assert _show(b'{"a": 1}') == '{"a": 1}' and _show(None) == "null"  # one line already: as it is


def test_tail_prints_control_characters_escaped_not_to_the_terminal() -> None:
    """A producer's value retitled (OSC), rang (BEL) and cleared (CSI 2J) the terminal of the operator tailing it."""
    from streams.cli import _show

    assert _show(b"\x1b]0;x\x07\x1b[2J") == "\\u001b]0;x\\u0007\\u001b[2J"
    assert _show("\u009b31mred\x7f\x00".encode()) == "\\u009b31mred\\u007f\\u0000"  # C1 CSI, DEL, NUL
    assert _show("a\tb\u2028c\u202eevil".encode()) == "a\\tb\\u2028c\\u202eevil"  # tab, line separator, bidi
    pretty = '{\n  "title": "\u009b2J\\u001b[2J"\n}'.encode()  # JSON with line breaks: compact, its C1 escaped too
    assert _show(pretty) == '{"title":"\\u009b2J\\u001b[2J"}'
    assert _show("naïve — 東京 🎉 10\u00a0kg".encode()) == "naïve — 東京 🎉 10\u00a0kg"  # printable text: as it is
    for raw in (b"\x1b]0;x\x07\x1b[2J", "\u009b\r\n\x85".encode(), b"\xff\x1b"):
        line = _show(raw)
        assert line.isprintable() and "\\" in line, line  # one line, nothing a terminal acts on


@pytest.mark.parametrize(
    "value",
    [
        {"title": "Shirt \u0096 blue", "d": "a\u007fb"},  # C1 (cp1252 mojibake of "–") and DEL in strings
        {"a": "\x1b[2J\u2028\u202e\x85", "n": [1, 2.5, None, True]},  # ESC, line separator, bidi, C1 NEL
    ],
)
def test_tail_prints_a_json_value_with_control_characters_as_valid_json(value: dict) -> None:
    """`tail | jq` broke: C1 and DEL were escaped as `\\xHH`, which JSON has not."""
    from streams.cli import _show

    line = _show(orjson.dumps(value))
    assert json.loads(line) == value and line.isprintable()


def test_tail_prints_a_json_value_with_a_tab_between_its_tokens_as_valid_json() -> None:
    """A tab between tokens (no line break) was printed as `\\t` outside any string: no JSON any more."""
    from streams.cli import _show

    for raw in (b'{"a":\t1}', b'{"a":\t"x\\u0007",\t"b":\t[1,\t2]}\t'):
        line = _show(raw)
        assert json.loads(line) == json.loads(raw) and line.isprintable(), line
    assert _show(b"not\tjson\x07") == "not\\tjson\\u0007"  # no JSON: escaped, visible, on one line


def test_replay_check_judges_each_line_as_the_worker_decodes_it(tmp_path) -> None:
    from streams.cli import REPLAY_MAX_REQUEST_BYTES, check_replay_file

    path = tmp_path / "events.jsonl"
    lines = [
        _upsert_line("jd-a"),
        b"",
        b"[1, 2]",
        b'{"schema_version": 1, "op": "upsert", "product_id": "jd-c", "updated_at": 1, "version": 1}',  # no title
        b"\xef\xbb\xbf" + _upsert_line("jd-bom"),
        _upsert_line("jd-b") + b"\r",
    ]
    path.write_bytes(b"\n".join(lines))
    check = check_replay_file(path, "products", REPLAY_MAX_REQUEST_BYTES)
    assert (check.events, check.invalid, check.oversize) == (5, 3, 0)
    assert check.first_invalid is not None and check.first_invalid.line_no == 3
    assert "expected a JSON object" in check.first_invalid.reason
    assert check.refusal(send_invalid=True) is None  # only invalid lines: --send-invalid sends the file
    assert check.refusal(send_invalid=False) is not None


def test_replay_sends_a_crlf_files_events_without_their_line_ends(tmp_path) -> None:
    from streams.cli import REPLAY_MAX_REQUEST_BYTES, replay_lines

    path = tmp_path / "events.jsonl"
    path.write_bytes(_upsert_line("jd-a") + b"\r\n" + _upsert_line("jd-b") + b"\r\n")
    values = [line.value for line in replay_lines(path, "products", REPLAY_MAX_REQUEST_BYTES)]
    assert values == [_upsert_line("jd-a"), _upsert_line("jd-b")]  # the bytes the catalog service would send


def test_replay_check_refuses_an_event_time_the_worker_would_dead_letter(tmp_path) -> None:
    from streams.cli import REPLAY_MAX_REQUEST_BYTES, check_replay_file

    path = tmp_path / "clicks.jsonl"
    micros = 1_764_316_800_000_000  # a time in microseconds
    click = {"schema_version": 1, "event_type": "view", "product_id": "p", "user_id": "u", "ts": micros}
    path.write_bytes(orjson.dumps(click) + b"\n")
    check = check_replay_file(path, "behavior", REPLAY_MAX_REQUEST_BYTES, ahead_ms=86_400_000)
    assert check.invalid == 1 and check.first_invalid is not None and str(micros) in check.first_invalid.reason
    assert check_replay_file(path, "behavior", REPLAY_MAX_REQUEST_BYTES).invalid == 0  # ahead_ms 0: no time check


@pytest.mark.parametrize("bad", ["0", "-1", "abc", "inf", "nan"])
def test_replay_rate_must_be_a_positive_number(capsys: pytest.CaptureFixture[str], tmp_path, bad: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["replay", str(tmp_path / "x.jsonl"), "--topic", "behavior", "--rate", bad])
    assert exc.value.code == 2
    assert "argument --rate: " in capsys.readouterr().err


@pytest.mark.usefixtures("kafka_down")
def test_tail_latest_needs_a_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tail", "tag-updates", "--latest"]) == 2
    assert "--latest needs -n N" in only_error_line(capsys, "tail")


@pytest.mark.parametrize(
    ("option", "bad"), [("--limit", "0"), ("--limit", "-5"), ("--products", "-5"), ("--events", "-5")]
)
def test_demo_refuses_bad_counts_when_parsing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path, option: str, bad: str
) -> None:
    import tagstream.stack

    def no_stack(*a: object, **k: object) -> None:
        raise AssertionError("the demo started the stack before checking its arguments")

    monkeypatch.setattr(tagstream.stack, "stack_up", no_stack)
    with pytest.raises(SystemExit) as exc:
        main(["demo", option, bad, "--workdir", str(tmp_path / "d")])  # argparse stops here: no stack, no training
    assert exc.value.code == 2
    assert f"argument {option}: " in capsys.readouterr().err.strip().splitlines()[-1]
    assert build_parser().parse_args(["demo", "--events", "0", "--limit", "50"]).events == 0


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--format", "myntra"], "--format go with --catalog FILE"),
        (["--limit", "500"], "--limit go with --catalog FILE"),
        (["--catalog", "c.jsonl", "--products", "500"], "--products sizes the generated catalog"),
    ],
)
def test_demo_refuses_catalog_options_without_their_catalog_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path, argv: list[str], said: str
) -> None:
    import tagstream.stack

    def no_stack(*a: object, **k: object) -> None:
        raise AssertionError("the demo started the stack before checking its arguments")

    monkeypatch.setattr(tagstream.stack, "stack_up", no_stack)
    # before: silently ignored (a generated catalog trained and replayed as if --format myntra had been heard)
    assert main(["demo", *argv, "--workdir", str(tmp_path / "d")]) == 2
    assert said in only_error_line(capsys, "demo")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_model_commands_refuse_a_wait_that_is_no_number_of_seconds(
    capsys: pytest.CaptureFixture[str], value: str
) -> None:
    # `--wait nan` or `--wait -1` used to be taken: the command sent its request, then waited for nothing
    with pytest.raises(SystemExit) as exit_:
        main(["model", "rollback", "--wait", value])
    assert (
        exit_.value.code == 2 and f"argument --wait: invalid wait_seconds value: '{value}'" in capsys.readouterr().err
    )
    assert build_parser().parse_args(["model", "rollback", "--wait", "2.5"]).wait == 2.5


def test_replay_checks_a_topic_not_made_yet_against_the_brokers_message_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import aiokafka.admin

    from streams.cli import _message_limit
    from streams.settings import WorkerSettings

    class Admin:  # a broker whose message.max.bytes (500,000) is below the producer's 1 MiB, no such topic yet
        def __init__(self, **kwargs: object) -> None:
            pass

        async def start(self) -> None:
            pass

        async def close(self) -> None:
            pass

        async def describe_cluster(self) -> dict:
            return {"brokers": [{"node_id": 7}]}

        async def describe_configs(self, resources: list) -> list:
            [resource] = resources
            entries = [("message.max.bytes", "500000")] if resource.name == "7" else []  # the topic: none
            return [SimpleNamespace(resources=[(3 if entries == [] else 0, "", 0, resource.name, entries)])]

    monkeypatch.setattr(aiokafka.admin, "AIOKafkaAdminClient", Admin)
    assert asyncio.run(_message_limit(WorkerSettings(), "products")) == 500_000  # before: 1,048,576


@pytest.mark.usefixtures("kafka_down")
def test_redrive_refuses_in_one_line_when_redis_where_it_records_what_it_sent_is_unreachable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TAGSTREAM_REDIS_URL", UNREACHABLE["TAGSTREAM_REDIS_URL"])
    assert main(["redrive", "--dry-run"]) == 2
    line = only_error_line(capsys, "redrive")
    assert "could not reach Redis" in line and ":redriven" in line and "TAGSTREAM_REDIS_URL" in line
