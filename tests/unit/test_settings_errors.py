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
        ("TAGSTREAM_BEHAVIOUR_TTL_S", "3600", "at least 604800 s (7 days, the longest window)"),  # counts would vanish
        ("TAGSTREAM_MODEL_ROOTS", '["models"]', "every model root must be an absolute path"),  # relative to what?
        ("TAGSTREAM_REPLICATION_FACTOR", "0", "a topic needs at least 1 replica"),  # Kafka's refusal, named earlier
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


@pytest.mark.parametrize("url", ["notaurl", "http://127.0.0.1:6379/0", "REDIS://h", "redis//:hunter2@127.0.0.1:6379/0"])
@pytest.mark.parametrize(
    ("command", "what"),
    [
        (["model", "status"], "worker"),
        (["lookup"], "lookup"),
        (["worker"], "worker"),
        (["topics"], "worker"),
        (["bench", "--smoke", "--out", "/nonexistent/bench"], "worker"),  # for the workers it starts
    ],
)
def test_a_redis_url_without_a_redis_scheme_is_one_line_that_hides_the_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str, command: list[str], what: str
) -> None:
    err = _redis_url_error(monkeypatch, capsys, url, command, what)
    assert "redis://, rediss:// or unix://" in err and "hunter2" not in err
    assert "\n" not in err and "Traceback" not in err


def _redis_url_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str, command: list[str], what: str
) -> str:
    """Run `command` with TAGSTREAM_REDIS_URL=`url`: it must exit 2 with the settings error (never serve, never reach
    Kafka); returns stderr."""
    from aiohttp import web

    def no_serving(*args: object, **kwargs: object) -> None:
        raise AssertionError("lookup started serving with a bad Redis URL")

    monkeypatch.setattr(web, "run_app", no_serving)
    monkeypatch.setenv("TAGSTREAM_REDIS_URL", url)
    monkeypatch.setenv("TAGSTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:1")  # never reached: the settings fail first
    monkeypatch.setenv("TAGSTREAM_EVENT_LOOP", "asyncio")
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tagstream {command[0]}: error: invalid {what} settings: redis_url: ")
    return err


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://127.0.0.1:notaport/0", "the port must be a number from 1 to 65535"),
        ("redis://127.0.0.1:99999/0", "the port must be a number from 1 to 65535"),
        ("redis://127.0.0.1:0/0", "the port must be a number from 1 to 65535"),  # redis-py took 6379
        ("redis://:hunter2/x@127.0.0.1:6379/0", "percent-encode"),  # urllib's error quoted 'hunter2'
        ("redis://[::1/0", "an IPv6 address in brackets"),
        ("redis://:pw[hunter2]@127.0.0.1/0", "an IPv6 address in brackets"),  # urllib's error quoted 'hunter2'
        ("redis://127.0.0.1:6379/0?socket_timeout=abc", "Invalid value for 'socket_timeout'"),
        ("redis://127.0.0.1:6379/0?sockettimeout=1", "unknown option 'sockettimeout'"),
        ("redis://:hunter2@127.0.0.1:6379/abc", "the path must be a database number such as /0"),  # was database 0
        ("redis://127.0.0.1:6379?db=-1", "the database number must be 0 or more"),
    ],
)
@pytest.mark.parametrize(("command", "what"), [(["lookup"], "lookup"), (["model", "status"], "worker")])
def test_a_malformed_redis_url_is_one_line_that_hides_the_password(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    url: str,
    problem: str,
    command: list[str],
    what: str,
) -> None:
    err = _redis_url_error(monkeypatch, capsys, url, command, what)
    assert problem in err and "hunter2" not in err
    assert "\n" not in err and "Traceback" not in err


def test_every_redis_scheme_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.cli import LookupSettings
    from streams.settings import WorkerSettings

    for url in (
        "redis://:pw@h:6379/0",
        "rediss://h",
        "unix:///run/redis.sock",
        "unix:///run/redis.sock?db=3",
        "redis://h/",
        "redis://:p%2Fw%40rd@[::1]:6379/2?socket_timeout=2&max_connections=5&timeout=3",
        "rediss://user:pw@h:6380/15?ssl_cert_reqs=none&health_check_interval=5",
    ):
        monkeypatch.setenv("TAGSTREAM_REDIS_URL", url)
        assert WorkerSettings().redis_url.get_secret_value() == url
        assert LookupSettings().redis_url.get_secret_value() == url


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_model_path_is_no_model_not_the_current_directory(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from streams.settings import WorkerSettings

    monkeypatch.setenv("TAGSTREAM_MODEL_PATH", value)  # docker-compose passes it through empty when unset on the host
    monkeypatch.setenv("TAGSTREAM_MODEL_GOLDEN_SET", value)
    settings = WorkerSettings()
    assert settings.model_path is None and settings.model_golden_set is None


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_user_hash_key_is_the_unset_key_not_an_empty_hmac_key(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    from streams.settings import DEV_USER_HASH_KEY, WorkerSettings

    monkeypatch.setenv(
        "TAGSTREAM_USER_HASH_KEY", value
    )  # docker-compose passes it through empty when unset on the host
    assert WorkerSettings().user_hash_key.get_secret_value() == DEV_USER_HASH_KEY  # so the worker warns at start
