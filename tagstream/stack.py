"""The local stack: a real single-node Kafka (KRaft) and a Redis on loopback, run in the background.

`tagstream stack up | down | status`. Kafka is assembled from Maven Central jars (fetched once with
`mvn dependency:copy-dependencies` into the cache dir) and run with `java -cp ... kafka.Kafka`; Redis is
Debian's `redis-server`. Both keep their configs, data, logs and PID files under the state dir, and are stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import psutil
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tagstream.errors import StackError
from tagstream.settings import load_settings, settings_errors

__all__ = [
    "ComponentStatus",
    "StackSettings",
    "StackStatus",
    "delete_keys",
    "register",
    "stack_down",
    "stack_status",
    "stack_up",
]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # the stack listens on loopback only
MIN_JAVA = 17
KAFKA = "kafka"
REDIS = "redis"

State = Literal["up", "down", "unhealthy"]


class StackSettings(BaseSettings):
    """Where and how the local stack runs; each field is also read from `TAGSTREAM_<FIELD>` (TAGSTREAM_REDIS_PORT)."""

    model_config = SettingsConfigDict(env_prefix="TAGSTREAM_", extra="ignore")

    kafka_port: int = Field(9092, ge=1, le=65535, description="Kafka client (PLAINTEXT) port")
    kafka_controller_port: int = Field(9093, ge=1, le=65535, description="Kafka KRaft controller port")
    redis_port: int = Field(6379, ge=1, le=65535, description="Redis port")
    state_dir: Path = Field(
        Path("~/.local/state/tagstream/stack"), description="configs, data, logs and PID files of the stack"
    )
    cache_dir: Path = Field(Path("~/.cache/tagstream"), description="downloaded Kafka jars (kafka-<version>/libs)")
    kafka_version: str = Field("4.1.1", description="org.apache.kafka:kafka_2.13 version fetched from Maven Central")
    log4j_version: str = Field("2.24.3", description="log4j2 version of that Kafka (for the slf4j binding)")
    kafka_heap: str = Field("512m", pattern=r"^\d+[kmgKMG]?$", description="Kafka JVM heap (-Xms/-Xmx)")
    stack_start_timeout: float = Field(120.0, gt=0, description="seconds to wait for a component to be healthy")
    stack_stop_timeout: float = Field(30.0, gt=0, description="seconds between SIGTERM and SIGKILL")
    java: str = Field("java", description="java executable (Java 17 or newer)")
    mvn: str = Field("mvn", description="Maven executable (only needed while the jars are not cached)")
    redis_server: str = Field("redis-server", description="redis-server executable")

    def __init__(self, **values: Any) -> None:
        """From the environment with `values` on top; a bad value (TAGSTREAM_KAFKA_PORT=abc) is a one-line
        ConfigError, also where a command builds `StackSettings()` itself (the demo, the bench)."""
        with settings_errors(type(self), "stack"):
            super().__init__(**values)

    @field_validator("state_dir", "cache_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @model_validator(mode="after")
    def _distinct_ports(self) -> StackSettings:
        ports = (self.kafka_port, self.kafka_controller_port, self.redis_port)
        if len(set(ports)) != len(ports):
            raise ValueError(f"kafka_port, kafka_controller_port and redis_port must differ, got {ports}")
        return self

    @property
    def kafka_bootstrap(self) -> str:
        """Bootstrap servers of the stack's Kafka."""
        return f"{HOST}:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        """URL of the stack's Redis (database 0)."""
        return f"redis://{HOST}:{self.redis_port}/0"

    @property
    def kafka_libs_dir(self) -> Path:
        """Where the Kafka jars are cached."""
        return self.cache_dir / f"kafka-{self.kafka_version}" / "libs"


@dataclass(frozen=True)
class ComponentStatus:
    """One component of the stack as seen now."""

    name: str
    state: State
    pid: int | None
    port: int
    log_file: Path
    detail: str = ""

    @property
    def up(self) -> bool:
        return self.state == "up"

    def describe(self) -> str:
        pid = str(self.pid) if self.pid else "-"
        line = f"{self.name:<6} {self.state:<9} pid {pid:<8} port {self.port:<6} log {self.log_file}"
        return f"{line}  ({self.detail})" if self.detail else line


@dataclass(frozen=True)
class StackStatus:
    """The whole stack; `started` names the components that the returning call started (empty for a no-op)."""

    kafka: ComponentStatus
    redis: ComponentStatus
    started: tuple[str, ...] = ()

    @property
    def components(self) -> tuple[ComponentStatus, ComponentStatus]:
        return (self.kafka, self.redis)

    @property
    def up(self) -> bool:
        return all(c.up for c in self.components)

    def describe(self) -> str:
        return "\n".join(c.describe() for c in self.components)


# -------------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _Component:
    name: str
    dir: Path
    port: int
    extra_ports: tuple[int, ...]
    pid_file: Path
    log_file: Path
    out_file: Path  # the process's stdout/stderr
    config: Path


def _kafka(s: StackSettings) -> _Component:
    d = s.state_dir / KAFKA
    return _Component(
        KAFKA,
        d,
        s.kafka_port,
        (s.kafka_controller_port,),
        d / "kafka.pid",
        d / "logs" / "server.log",
        d / "kafka.out",
        d / "server.properties",
    )


def _redis(s: StackSettings) -> _Component:
    d = s.state_dir / REDIS
    return _Component(REDIS, d, s.redis_port, (), d / "redis.pid", d / "redis.log", d / "redis.out", d / "redis.conf")


def _stackfile(name: str) -> str:
    return (resources.files("tagstream") / "stackfiles" / name).read_text(encoding="utf-8")


def _template(name: str, **values: object) -> str:
    return string.Template(_stackfile(name)).substitute({k: str(v) for k, v in values.items()})


def _server_properties(s: StackSettings) -> str:
    return _template(
        "server.properties",
        host=HOST,
        kafka_port=s.kafka_port,
        controller_port=s.kafka_controller_port,
        data_dir=_kafka(s).dir / "data",
    )


def _redis_conf(s: StackSettings) -> str:
    c = _redis(s)
    return _template("redis.conf", host=HOST, redis_port=s.redis_port, data_dir=c.dir / "data", log_file=c.log_file)


def _pom(s: StackSettings) -> str:
    return _template("pom.xml", kafka_version=s.kafka_version, log4j_version=s.log4j_version)


# ------------------------------------------------------------------------------------------- prerequisites


def _require(command: str, what: str, install: str) -> str:
    path = shutil.which(command)
    if path is None:
        raise StackError(f"{what} is needed but `{command}` is not on PATH; install it: {install}")
    return path


def _java(s: StackSettings) -> str:
    install = f"apt-get install -y openjdk-{MIN_JAVA}-jre-headless (or any Java {MIN_JAVA}+)"
    java = _require(s.java, f"Java {MIN_JAVA} or newer", install)
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StackError(f"cannot run `{java} -version`: {exc}") from exc
    major = _java_major(out.stderr + out.stdout)
    if major is None or major < MIN_JAVA:
        found = f"Java {major}" if major else "an unknown Java version"
        raise StackError(f"Java {MIN_JAVA} or newer is needed, found {found} at {java}; install it: {install}")
    return java


def _java_major(version_output: str) -> int | None:
    """The major version in `java -version` output (`1.8.0_x` is 8, `17.0.15` is 17)."""
    m = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def _redis_server(s: StackSettings) -> str:
    return _require(s.redis_server, "Redis", "apt-get install -y redis-server")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _kafka_libs(s: StackSettings) -> Path:
    """The cached Kafka jars, fetched with Maven on first use."""
    libs = s.kafka_libs_dir
    pom = _pom(s)
    digest = hashlib.sha256(pom.encode()).hexdigest()
    marker = libs / ".complete"
    with _locked(libs.parent / ".lock"):
        if marker.is_file() and marker.read_text().strip() == digest:
            return libs
        mvn = _require(s.mvn, "Maven (to fetch the Kafka jars once)", "apt-get install -y maven")
        pom_file = libs.parent / "pom.xml"
        pom_file.write_text(pom, encoding="utf-8")
        tmp = libs.parent / "libs.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("fetching Kafka %s jars from Maven Central into %s (first run only)", s.kafka_version, libs)
        cmd = [
            mvn,
            "-B",
            "-q",
            "-f",
            str(pom_file),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={tmp}",
        ]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        except subprocess.TimeoutExpired as exc:
            raise StackError(f"Maven did not fetch the Kafka jars within {exc.timeout:.0f} s") from exc
        jars = list(tmp.glob("*.jar")) if tmp.is_dir() else []
        if out.returncode != 0 or not any(j.name.startswith("kafka_2.13-") for j in jars):
            tail = _tail_text(out.stdout + out.stderr)
            raise StackError(f"Maven could not fetch the Kafka jars (`{' '.join(cmd)}` exit {out.returncode}):\n{tail}")
        shutil.rmtree(libs, ignore_errors=True)
        tmp.rename(libs)
        marker.write_text(digest + "\n")
        log.info("fetched %d jars", len(jars))
        return libs


# ----------------------------------------------------------------------------------------------- processes


def _matches(c: _Component, cmdline: str) -> bool:
    """Whether a process command line is this component's (guards against a reused PID)."""
    if c.name == KAFKA:
        return "kafka.Kafka" in cmdline and str(c.config) in cmdline
    return "redis-server" in cmdline and (re.search(rf":{c.port}\b", cmdline) is not None or str(c.config) in cmdline)


def _alive(pid: int) -> bool:
    """Whether `pid` runs; an exited child of this process is reaped (so no zombie is left behind).

    A JVM whose main thread has ended shows as a zombie while its other threads still shut down: that still runs.
    """
    try:
        proc = psutil.Process(pid)
        if proc.status() != psutil.STATUS_ZOMBIE:
            return True
        try:
            return os.waitpid(pid, os.WNOHANG)[0] == 0  # our child: 0 while it has not fully exited
        except ChildProcessError:
            return proc.num_threads() > 1
    except (psutil.Error, OSError):
        return False


def _running_pid(c: _Component, *, other_settings_ok: bool = False) -> int | None:
    """The PID in the component's PID file if that process is alive and is the component, else None.

    The PID file is removed only when its process is gone or is not a server of this kind (a reused PID). A
    redis-server on another port than the settings name was started by this state dir with other settings: that
    raises (or, with `other_settings_ok`, for stopping it, is returned) instead of losing track of it.
    """
    try:
        pid = int(c.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            if _alive(pid):  # still shutting down
                return pid
        else:
            cmdline = " ".join(proc.cmdline())
            if _matches(c, cmdline):
                return pid
            if c.name == REDIS and "redis-server" in cmdline:
                if other_settings_ok:
                    return pid
                raise StackError(
                    f"redis: this stack's redis-server (pid {pid}, {cmdline.split()[-1]}) was started with other "
                    f"settings than port {c.port}; stop it with `tagstream stack down` (it stops it whatever the "
                    "port) or use another TAGSTREAM_STATE_DIR"
                )
    except psutil.Error:
        pass
    c.pid_file.unlink(missing_ok=True)
    return None


def _port_owner(port: int) -> str | None:
    """None if `port` on loopback is free to listen on, else a description of who holds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
            return None
        except OSError:
            pass
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections("inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return f"{psutil.Process(conn.pid).name()} (pid {conn.pid})"
    return "another process"


def _spawn(c: _Component, cmd: list[str]) -> subprocess.Popen[bytes]:
    c.dir.mkdir(parents=True, exist_ok=True)
    with c.out_file.open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=c.dir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    c.pid_file.write_text(f"{proc.pid}\n")
    return proc


def _start_redis(s: StackSettings, binary: str) -> subprocess.Popen[bytes]:
    c = _redis(s)
    (c.dir / "data").mkdir(parents=True, exist_ok=True)
    c.config.write_text(_redis_conf(s), encoding="utf-8")
    return _spawn(c, [binary, str(c.config)])


def _start_kafka(s: StackSettings, java: str, libs: Path) -> subprocess.Popen[bytes]:
    c = _kafka(s)
    data = c.dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    c.log_file.parent.mkdir(parents=True, exist_ok=True)
    c.config.write_text(_server_properties(s), encoding="utf-8")
    log4j = c.dir / "log4j2.properties"
    log4j.write_text(_stackfile("log4j2.properties"), encoding="utf-8")
    jvm = [
        java,
        f"-Dlog4j2.configurationFile={log4j}",
        f"-Dkafka.logs.dir={c.log_file.parent}",
        "-cp",
        f"{libs}/*",
    ]
    if not (data / "meta.properties").is_file():
        cluster_file = c.dir / "cluster.id"
        cluster_id = cluster_file.read_text().strip() if cluster_file.is_file() else _cluster_id()
        cluster_file.write_text(cluster_id + "\n")
        # controller.quorum.voters is set, so no --standalone.
        fmt = [
            *jvm,
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(c.config),
            "--ignore-formatted",
        ]
        log.info("formatting Kafka storage in %s (cluster id %s)", data, cluster_id)
        out = subprocess.run(fmt, capture_output=True, text=True, timeout=300, check=False)
        if out.returncode != 0:
            raise StackError(
                f"formatting Kafka storage failed (exit {out.returncode}):\n{_tail_text(out.stdout + out.stderr)}"
            )
    heap = s.kafka_heap
    opts = [
        f"-Xms{heap}",
        f"-Xmx{heap}",
        "-XX:+UseG1GC",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
    ]
    return _spawn(c, [jvm[0], *opts, *jvm[1:], "kafka.Kafka", str(c.config)])


def _cluster_id() -> str:
    """A random Kafka cluster id (a base64url UUID, never starting with '-')."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _stop(pids: dict[str, int], timeout: float) -> None:
    """SIGTERM every PID, wait up to `timeout` s, then SIGKILL what is left."""
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    left = _wait_gone(pids, timeout)
    for name, pid in left.items():
        log.warning("%s (pid %d) did not stop within %.0f s; killing it", name, pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if _wait_gone(left, 10.0):
        raise StackError(f"could not stop {', '.join(f'{n} (pid {p})' for n, p in left.items())}")


def _wait_gone(pids: dict[str, int], timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    left = dict(pids)
    while left:
        left = {n: p for n, p in left.items() if _alive(p)}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return left


def _tail_text(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _tail(path: Path, lines: int = 25) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 64 * 1024))
            return _tail_text(fh.read().decode("utf-8", "replace"), lines)
    except OSError:
        return ""


# -------------------------------------------------------------------------------------------------- health


def _run_coro(factory: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a coroutine to completion, also when called from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def _port_open(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _redis_healthy(s: StackSettings) -> bool:
    import redis

    client = redis.Redis(host=HOST, port=s.redis_port, socket_connect_timeout=1, socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _kafka_healthy(s: StackSettings) -> bool:
    """Real requests: the cluster has a live broker, topics can be listed, and the group coordinator answers (on a
    freshly formatted broker it needs a moment to create `__consumer_offsets`; consumer groups fail until then)."""
    if not _port_open(s.kafka_port):
        return False

    async def check() -> bool:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            cluster = await admin.describe_cluster()
            await admin.list_topics()
            await admin.list_consumer_group_offsets("tagstream-stack-health")
            return bool(cluster.get("brokers"))
        finally:
            await admin.close()

    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # connection errors while Kafka starts are expected
    try:
        return bool(_run_coro(check))
    except Exception:
        return False
    finally:
        quiet.setLevel(level)


_HEALTH: dict[str, Callable[[StackSettings], bool]] = {KAFKA: _kafka_healthy, REDIS: _redis_healthy}


def _component_status(s: StackSettings, c: _Component) -> ComponentStatus:
    pid = _running_pid(c)
    if pid is None:
        owner = _port_owner(c.port)
        detail = f"port {c.port} is held by {owner}, not by this stack" if owner else ""
        return ComponentStatus(c.name, "down", None, c.port, c.log_file, detail)
    if _HEALTH[c.name](s):
        return ComponentStatus(c.name, "up", pid, c.port, c.log_file)
    return ComponentStatus(c.name, "unhealthy", pid, c.port, c.log_file, "running but not answering")


def _wait_healthy(s: StackSettings, c: _Component, proc: subprocess.Popen[bytes] | None, pid: int) -> None:
    deadline = time.monotonic() + s.stack_start_timeout
    while True:
        if _HEALTH[c.name](s):
            return
        code = proc.poll() if proc is not None else (None if _alive(pid) else "?")
        if code is not None:
            c.pid_file.unlink(missing_ok=True)
            raise StackError(
                f"{c.name} exited while starting (exit code {code}); see {c.log_file} and {c.out_file}:\n"
                f"{_tail(c.log_file) or _tail(c.out_file)}"
            )
        if time.monotonic() > deadline:
            if proc is None:  # running before this call (still loading its data, say): not this call's to stop
                raise StackError(
                    f"{c.name} (pid {pid}, started before) is running but not healthy after "
                    f"{s.stack_start_timeout:.0f} s; left running (a large append-only file or log takes time to "
                    f"load); see {c.log_file}:\n{_tail(c.log_file) or _tail(c.out_file)}"
                )
            _stop({c.name: pid}, s.stack_stop_timeout)
            c.pid_file.unlink(missing_ok=True)
            raise StackError(
                f"{c.name} was not healthy within {s.stack_start_timeout:.0f} s (stopped it); "
                f"see {c.log_file}:\n"
                f"{_tail(c.log_file) or _tail(c.out_file)}"
            )
        time.sleep(0.25)


# ----------------------------------------------------------------------------------------------------- API


def stack_status(settings: StackSettings | None = None) -> StackStatus:
    """The state, PID and port of Kafka and Redis."""
    s = settings or StackSettings()
    return StackStatus(_component_status(s, _kafka(s)), _component_status(s, _redis(s)))


def stack_up(settings: StackSettings | None = None) -> StackStatus:
    """Start what is not running and wait until Kafka and Redis are healthy; a no-op when already up."""
    s = settings or StackSettings()
    with _locked(s.state_dir / "stack.lock"):
        comps = {KAFKA: _kafka(s), REDIS: _redis(s)}
        running = {name: _running_pid(c) for name, c in comps.items()}
        to_start = [name for name, pid in running.items() if pid is None]
        # Everything that can fail cheaply is checked before anything starts.
        java = _java(s) if KAFKA in to_start else ""
        redis_bin = _redis_server(s) if REDIS in to_start else ""
        libs = _kafka_libs(s) if KAFKA in to_start else Path()
        for name in to_start:
            c = comps[name]
            for port in (c.port, *c.extra_ports):
                if owner := _port_owner(port):
                    raise StackError(
                        f"cannot start {name}: port {port} on {HOST} is already in use by {owner}; "
                        f"stop it or choose other ports (TAGSTREAM_KAFKA_PORT, TAGSTREAM_KAFKA_CONTROLLER_PORT, "
                        f"TAGSTREAM_REDIS_PORT)"
                    )
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            if REDIS in to_start:
                procs[REDIS] = _start_redis(s, redis_bin)
                log.info("started redis (pid %d) on port %d", procs[REDIS].pid, s.redis_port)
            if KAFKA in to_start:
                procs[KAFKA] = _start_kafka(s, java, libs)
                log.info(
                    "started kafka (pid %d) on port %d; waiting until it is healthy",
                    procs[KAFKA].pid,
                    s.kafka_port,
                )
            for name, c in comps.items():
                proc = procs.get(name)
                pid = proc.pid if proc else running[name]
                assert pid is not None
                _wait_healthy(s, c, proc, pid)
        except BaseException:
            started = {n: p.pid for n, p in procs.items() if p.poll() is None}
            _stop(started, s.stack_stop_timeout)
            for n in started:
                comps[n].pid_file.unlink(missing_ok=True)
            raise
        status = stack_status(s)
        return StackStatus(status.kafka, status.redis, tuple(n for n in (KAFKA, REDIS) if n in procs))


def stack_down(settings: StackSettings | None = None) -> list[str]:
    """Stop the stack's processes by PID (SIGTERM, then SIGKILL); returns the names of those it stopped."""
    s = settings or StackSettings()
    with _locked(s.state_dir / "stack.lock"):
        comps = {KAFKA: _kafka(s), REDIS: _redis(s)}
        pids = {name: pid for name, c in comps.items() if (pid := _running_pid(c, other_settings_ok=True)) is not None}
        _stop(pids, s.stack_stop_timeout)
        for name in pids:
            comps[name].pid_file.unlink(missing_ok=True)
        return list(pids)


def delete_keys(redis_url: str, prefix: str) -> int:
    """Delete every Redis key under `prefix:` (a run's own prefix: callers check it is theirs); returns how many."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        deleted = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                deleted += client.unlink(*batch)
                batch = []
        if batch:
            deleted += client.unlink(*batch)
        return deleted
    finally:
        client.close()


# ----------------------------------------------------------------------------------------------------- CLI


def _settings(args: argparse.Namespace) -> StackSettings:
    keys = ("kafka_port", "kafka_controller_port", "redis_port", "state_dir")
    return load_settings(StackSettings, "stack", **{key: getattr(args, key, None) for key in keys})


def _cmd_up(args: argparse.Namespace) -> int:
    s = _settings(args)
    started = time.monotonic()
    status = stack_up(s)
    if status.started:
        print(f"stack: started {', '.join(status.started)} in {time.monotonic() - started:.1f} s")
    else:
        print("stack: already up")
    print(status.describe())
    print(f"kafka bootstrap {s.kafka_bootstrap}   redis {s.redis_url}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    stopped = stack_down(_settings(args))
    print(f"stack: stopped {', '.join(stopped)}" if stopped else "stack: already down")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    status = stack_status(_settings(args))
    print(status.describe())
    return 0 if status.up else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `stack up | down | status`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--kafka-port", type=int, help="Kafka port (default 9092, env TAGSTREAM_KAFKA_PORT)")
    common.add_argument(
        "--kafka-controller-port",
        type=int,
        help="KRaft controller port (default 9093, env TAGSTREAM_KAFKA_CONTROLLER_PORT)",
    )
    common.add_argument("--redis-port", type=int, help="Redis port (default 6379, env TAGSTREAM_REDIS_PORT)")
    common.add_argument("--state-dir", type=Path, help="state directory (env TAGSTREAM_STATE_DIR)")
    parser = subparsers.add_parser(
        "stack", help="run a local Kafka (KRaft) and Redis in the background", description=__doc__
    )
    actions = parser.add_subparsers(dest="stack_command", required=True, metavar="ACTION")
    for name, func, help_text in (
        ("up", _cmd_up, "start Kafka and Redis and wait until healthy (no-op when already up)"),
        ("down", _cmd_down, "stop them (SIGTERM, then SIGKILL)"),
        ("status", _cmd_status, "print each component's state, PID and port; exit 1 unless all are up"),
    ):
        actions.add_parser(name, parents=[common], help=help_text, description=help_text).set_defaults(func=func)
