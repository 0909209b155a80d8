"""The local stack without starting anything: prerequisites, rendered configs, PID-file handling, CLI, compose."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from pathlib import Path

import pytest

from tagstream import stack
from tagstream.errors import ConfigError, StackError
from tagstream.stack import StackSettings, stack_down, stack_status, stack_up

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(tmp_path: Path) -> StackSettings:
    return StackSettings(
        kafka_port=29092,
        kafka_controller_port=29093,
        redis_port=26379,
        state_dir=tmp_path / "state",
        cache_dir=tmp_path / "cache",
    )


def fake_bin(directory: Path, name: str, script: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return path


def java_17(directory: Path) -> None:
    fake_bin(directory, "java", """echo 'openjdk version "17.0.15" 2025-04-15' >&2""")


# ------------------------------------------------------------------------------------------------ prerequisites


def test_missing_java_names_the_package(settings: StackSettings, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(StackError, match=r"Java 17 or newer.*apt-get install -y openjdk-17-jre-headless"):
        stack_up(settings)
    assert not list(settings.state_dir.rglob("*.pid")), "nothing may start when a prerequisite is missing"


def test_old_java_is_refused(settings: StackSettings, tmp_path: Path, monkeypatch) -> None:
    fake_bin(tmp_path / "bin", "java", """echo 'openjdk version "11.0.2" 2019-01-15' >&2""")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(StackError, match=r"found Java 11 .*apt-get install -y openjdk-17"):
        stack_up(settings)


def test_missing_redis_server_names_the_package(settings: StackSettings, tmp_path: Path, monkeypatch) -> None:
    java_17(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(StackError, match=r"Redis.*`redis-server` is not on PATH.*apt-get install -y redis-server"):
        stack_up(settings)


def test_missing_maven_names_the_package_when_jars_are_not_cached(
    settings: StackSettings, tmp_path: Path, monkeypatch
) -> None:
    java_17(tmp_path / "bin")
    fake_bin(tmp_path / "bin", "redis-server", "exit 1")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(StackError, match=r"Maven.*`mvn` is not on PATH.*apt-get install -y maven"):
        stack_up(settings)
    assert not list(settings.state_dir.rglob("*.pid"))


def test_failing_maven_reports_its_output(settings: StackSettings, tmp_path: Path, monkeypatch) -> None:
    fake_bin(tmp_path / "bin", "mvn", "echo '[ERROR] Could not resolve dependencies' ; exit 1")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(StackError, match=r"(?s)Maven could not fetch.*Could not resolve dependencies"):
        stack._kafka_libs(settings)
    assert not settings.kafka_libs_dir.exists()


def test_cached_jars_need_no_maven(settings: StackSettings, tmp_path: Path, monkeypatch) -> None:
    libs = settings.kafka_libs_dir
    fake_bin(tmp_path / "bin", "mvn", f"mkdir -p {libs}.tmp && touch {libs}.tmp/kafka_2.13-4.1.1.jar")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")  # the fake mvn comes first
    assert stack._kafka_libs(settings) == libs
    assert (libs / "kafka_2.13-4.1.1.jar").is_file()
    assert (libs.parent / "pom.xml").is_file()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert stack._kafka_libs(settings) == libs  # cached: Maven is not looked for


@pytest.mark.parametrize(
    ("output", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15', 17),
        ('openjdk version "21" 2023-09-19', 21),
        ('java version "1.8.0_392"', 8),
        ("no version here", None),
    ],
)
def test_java_major(output: str, major: int | None) -> None:
    assert stack._java_major(output) == major


# ----------------------------------------------------------------------------------------------------- settings


def test_settings_read_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TAGSTREAM_REDIS_PORT", "7001")
    monkeypatch.setenv("TAGSTREAM_KAFKA_PORT", "7002")
    monkeypatch.setenv("TAGSTREAM_STATE_DIR", str(tmp_path))
    s = StackSettings()
    assert (s.redis_port, s.kafka_port, s.state_dir) == (7001, 7002, tmp_path)
    assert s.kafka_bootstrap == "127.0.0.1:7002"
    assert s.redis_url == "redis://127.0.0.1:7001/0"


def test_settings_defaults(monkeypatch) -> None:
    for name in list(os.environ):
        if name.startswith("TAGSTREAM_"):
            monkeypatch.delenv(name)
    s = StackSettings()
    assert (s.kafka_port, s.kafka_controller_port, s.redis_port) == (9092, 9093, 6379)
    assert s.state_dir == Path.home() / ".local/state/tagstream/stack"
    assert s.kafka_libs_dir == Path.home() / ".cache/tagstream/kafka-4.1.1/libs"


def test_settings_refuse_clashing_ports() -> None:
    with pytest.raises(ConfigError, match=r"^invalid stack settings: .*must differ") as info:
        StackSettings(kafka_port=9092, redis_port=9092)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("argv", [["stack", "status"], ["stack", "up"], ["demo"]])
def test_a_bad_stack_setting_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    from tagstream import cli

    monkeypatch.setenv("TAGSTREAM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("TAGSTREAM_KAFKA_PORT", "abc")
    if argv == ["demo"]:  # it builds StackSettings() itself
        argv = ["demo", "--workdir", str(tmp_path / "demo")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tagstream {argv[0]}: error: invalid stack settings: kafka_port: ") and "'abc'" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "state").exists() and not (tmp_path / "demo").exists()


# ------------------------------------------------------------------------------------------------------ configs


def properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def test_server_properties(settings: StackSettings) -> None:
    props = properties(stack._server_properties(settings))
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:29093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:29092,CONTROLLER://127.0.0.1:29093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:29092"
    assert props["log.dirs"] == str(settings.state_dir / "kafka" / "data")
    assert props["auto.create.topics.enable"] == "false"
    assert props["num.partitions"] == "4"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.replication.factor"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"
    assert "$" not in stack._server_properties(settings)


def test_redis_conf(settings: StackSettings) -> None:
    text = stack._redis_conf(settings)
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in text.splitlines() if line and line[0] != "#"}
    assert lines["bind"] == "127.0.0.1"
    assert lines["port"] == "26379"
    assert lines["save"] == '""'
    assert lines["appendonly"] == "yes" and lines["appendfsync"] == "everysec"  # state survives a restart
    assert lines["maxmemory-policy"] == "noeviction"  # and no key is ever evicted
    assert lines["daemonize"] == "no"
    assert lines["logfile"] == f'"{settings.state_dir / "redis" / "redis.log"}"'
    assert "$" not in text


def test_pom_fetches_kafka_and_the_log4j_binding(settings: StackSettings) -> None:
    pom = stack._pom(settings)
    assert re.search(r"<artifactId>kafka_2.13</artifactId>\s*<version>4.1.1</version>", pom)
    assert re.search(r"<artifactId>log4j-slf4j-impl</artifactId>\s*<version>2.24.3</version>", pom)
    assert "$" not in pom


def test_log4j_config_writes_to_a_file() -> None:
    text = stack._stackfile("log4j2.properties")
    assert "${sys:kafka.logs.dir}/server.log" in text
    assert "Console" not in text


def test_cluster_id_is_a_kafka_uuid() -> None:
    for _ in range(50):
        cid = stack._cluster_id()
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cid) and not cid.startswith("-")


# ----------------------------------------------------------------------------------------------- PIDs, status


def test_status_and_down_of_a_stack_that_never_ran(settings: StackSettings) -> None:
    status = stack_status(settings)
    assert not status.up
    assert [(c.name, c.state, c.pid, c.port) for c in status.components] == [
        ("kafka", "down", None, 29092),
        ("redis", "down", None, 26379),
    ]
    assert stack_down(settings) == []


def test_a_pid_file_of_another_process_is_ignored_and_never_killed(settings: StackSettings) -> None:
    for name in ("kafka", "redis"):
        pid_file = settings.state_dir / name / f"{name}.pid"
        pid_file.parent.mkdir(parents=True)
        pid_file.write_text(f"{os.getpid()}\n")  # alive, but not Kafka nor Redis
    assert stack_status(settings).kafka.state == "down"
    assert stack_down(settings) == []  # and this test process is still alive
    assert not list(settings.state_dir.rglob("*.pid"))


def test_stale_pid_file_is_dropped(settings: StackSettings) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    pid_file = settings.state_dir / "redis" / "redis.pid"
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text(f"{proc.pid}\n")
    assert stack_status(settings).redis.pid is None
    assert not pid_file.exists()


def test_a_status_with_another_redis_port_keeps_track_of_the_running_redis(settings: StackSettings) -> None:
    # The stack's Redis started on 6379; a later command run with TAGSTREAM_REDIS_PORT=26379 used to take its PID
    # file for a reused PID and delete it, so `stack down` could no longer stop that Redis.
    import sys

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)", "redis-server", "127.0.0.1:6379"]
    proc = subprocess.Popen(sleeper)  # shows as a redis-server on another port than the settings'
    try:
        pid_file = settings.state_dir / "redis" / "redis.pid"
        pid_file.parent.mkdir(parents=True)
        pid_file.write_text(f"{proc.pid}\n")
        with pytest.raises(StackError, match=r"started with other settings than port 26379"):
            stack_status(settings)
        with pytest.raises(StackError, match=r"other settings"):
            stack_up(settings)
        assert pid_file.read_text() == f"{proc.pid}\n"
        assert stack_down(settings) == ["redis"]  # stopped whatever its port
        assert proc.wait(timeout=30) is not None and not pid_file.exists()
    finally:
        proc.kill()
        proc.wait()


def test_describe_lists_state_pid_and_port(settings: StackSettings) -> None:
    text = stack_status(settings).describe()
    assert re.search(r"^kafka\s+down\s+pid -\s+port 29092", text, re.M)
    assert re.search(r"^redis\s+down\s+pid -\s+port 26379", text, re.M)


# ---------------------------------------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagstream")
    stack.register(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_actions_set_func() -> None:
    for action in ("up", "down", "status"):
        args = parser().parse_args(["stack", action, "--redis-port", "7777"])
        assert callable(args.func) and args.redis_port == 7777


def test_cli_status_exits_non_zero_when_down(settings: StackSettings, capsys) -> None:
    args = parser().parse_args(
        ["stack", "status", "--state-dir", str(settings.state_dir), "--kafka-port", "29092", "--redis-port", "26379"]
    )
    assert args.func(args) == 1
    assert "kafka" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- packaging, compose


def test_stackfiles_are_package_data() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'tagstream = ["stackfiles/*"]' in pyproject
    for name in ("pom.xml", "server.properties", "log4j2.properties", "redis.conf"):
        assert stack._stackfile(name)


def test_compose_kafka_is_in_step_with_the_scripted_one(settings: StackSettings) -> None:
    import yaml

    from streams.settings import WorkerSettings

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "redis", "worker", "trainer"} <= set(services)
    kafka = services["kafka"]
    assert kafka["image"] == "apache/kafka:4.1.1"
    env = {k: str(v) for k, v in kafka["environment"].items()}
    host_specific = {"listeners", "advertised.listeners", "controller.quorum.voters", "log.dirs"}
    host_specific |= {"listener.security.protocol.map", "inter.broker.listener.name"}
    for key, value in properties(stack._server_properties(settings)).items():
        if key not in host_specific:
            assert env.get("KAFKA_" + key.upper().replace(".", "_")) == value, key
    redis_service = services["redis"]
    assert redis_service["image"].startswith("redis:7")
    # both keep their data across restarts, in step with the scripted stack (a worker resumes on its state)
    command = redis_service["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert [v.split(":")[1] for v in redis_service["volumes"]] == ["/data"]
    assert [v.split(":")[1] for v in kafka["volumes"]] == [env["KAFKA_LOG_DIRS"]]
    for name in ("worker", "trainer"):
        worker_env = services[name]["environment"]
        # a host's topic prefix comes with its Redis prefix and group, or the worker refuses the state
        assert {"TAGSTREAM_TOPIC_PREFIX", "TAGSTREAM_REDIS_PREFIX", "TAGSTREAM_APP_ID"} <= set(worker_env)
        fields = WorkerSettings.model_fields  # unset on the host: the settings' defaults, never an empty value
        for name in ("redis_prefix", "app_id"):
            variable = f"TAGSTREAM_{name.upper()}"
            assert worker_env[variable] == f"${{{variable}:-{fields[name].default}}}"
        assert worker_env["TAGSTREAM_KAFKA_BOOTSTRAP"] == "kafka:9092"
        assert worker_env["TAGSTREAM_REDIS_URL"] == "redis://redis:6379/0"
    assert services["worker"]["command"][0] == "worker"


def test_ci_script_is_valid_bash() -> None:
    script = REPO / ".ci" / "run"
    assert "set -euo pipefail" in script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_cli_main_reports_a_missing_prerequisite_in_one_line(
    settings: StackSettings, tmp_path: Path, monkeypatch, capsys
) -> None:
    from tagstream import cli

    monkeypatch.setattr(cli, "COMMAND_MODULES", ("tagstream.stack",))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    argv = ["stack", "up", "--state-dir", str(settings.state_dir), "--kafka-port", "29092", "--redis-port", "26379"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tagstream stack: error: Java 17 or newer") and "apt-get install -y" in err


def test_a_port_held_by_another_process_is_reported(settings: StackSettings, tmp_path: Path, monkeypatch) -> None:
    import socket

    libs = settings.kafka_libs_dir
    java_17(tmp_path / "bin")
    fake_bin(tmp_path / "bin", "redis-server", "exit 1")
    fake_bin(tmp_path / "bin", "mvn", f"mkdir -p {libs}.tmp && touch {libs}.tmp/kafka_2.13-4.1.1.jar")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        busy = settings.model_copy(update={"redis_port": port})
        with pytest.raises(StackError, match=rf"cannot start redis: port {port} .* already in use by python"):
            stack_up(busy)
    assert not list(settings.state_dir.rglob("*.pid"))


def test_a_component_running_before_up_but_slow_to_answer_is_left_running(
    settings: StackSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second `stack up` while Redis still loaded a large append-only file SIGTERMed it ("stopped it")."""
    import sys

    loading = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        monkeypatch.setitem(stack._HEALTH, "redis", lambda s: False)  # PING answers LOADING
        slow = settings.model_copy(update={"stack_start_timeout": 0.3})
        with pytest.raises(StackError, match=r"redis \(pid \d+, started before\) is running but not healthy") as err:
            stack._wait_healthy(slow, stack._redis(slow), None, loading.pid)
        assert "left running" in str(err.value) and loading.poll() is None
    finally:
        loading.kill()
        loading.wait()
