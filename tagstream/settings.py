"""Loading a service's pydantic Settings from the environment with one-line errors (ConfigError), for every command."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Annotated, Any, TypeVar, get_args

from pydantic import AfterValidator, SecretBytes, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsError

from tagstream.errors import ConfigError

__all__ = ["REDIS_URL_SCHEMES", "RedisUrl", "load_settings", "settings_errors"]

S = TypeVar("S", bound=BaseSettings)

REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://")  # what redis-py's from_url accepts


def _redis_url_problem(url: str) -> str | None:
    """What redis-py's URL parser would refuse in `url`, or silently ignore (a port 0, a database path that is not a
    number), or what its connections would refuse (an unknown query option); None when it is usable. The answer never
    quotes the URL, which may hold a password (urllib's own messages can quote part of it)."""
    from urllib.parse import unquote, urlsplit

    from redis.asyncio.connection import Connection, parse_url
    from redis.exceptions import RedisError

    encode = "percent-encode / ? # @ [ ] in a user name or password"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        if str(exc).startswith("Port"):
            return f"the port must be a number from 1 to 65535 ({encode})"
        return f"the host must be a name, an IPv4 address or an IPv6 address in brackets ({encode})"
    try:
        options = parse_url(url)
    except ValueError as exc:  # "Invalid value for '<option>' in connection URL."
        return str(exc).rstrip(".")
    if parts.scheme != "unix":
        if port == 0:  # redis-py would connect to 6379
            return "the port must be a number from 1 to 65535"
        if not re.fullmatch(r"/?|/\d+", unquote(parts.path)):  # redis-py would ignore it and use database 0
            return "the path must be a database number such as /0"
    if options.get("db", 0) < 0:
        return "the database number must be 0 or more"
    if (problem := _range_problem(options)) is not None:
        return problem
    connection_class = options.pop("connection_class", Connection)
    for pool_option in ("max_connections", "timeout"):  # taken by the connection pool, not the connection
        options.pop(pool_option, None)
    try:
        connection_class(**options)  # no I/O: connections connect when first used
    except TypeError as exc:
        m = re.search(r"argument '(\w+)'", str(exc))
        return f"unknown option {m.group(1)!r}" if m else "an option redis-py does not know"
    except (ValueError, RedisError):
        return "an option value that redis-py refuses"
    return None


# options redis-py parses as numbers but does not bound: a negative socket timeout passes its parser and then fails
# every command ("Timeout writing to socket"); the pool options would override the lookup's checked settings
_POSITIVE_OPTIONS = ("socket_timeout", "socket_connect_timeout", "timeout")
_NON_NEGATIVE_OPTIONS = ("health_check_interval",)


def _range_problem(options: dict[str, Any]) -> str | None:
    """A numeric URL option out of its range, or None."""
    for name in _POSITIVE_OPTIONS:
        if (value := options.get(name)) is not None and value <= 0:
            return f"the option {name} must be more than 0"
    for name in _NON_NEGATIVE_OPTIONS:
        if (value := options.get(name)) is not None and value < 0:
            return f"the option {name} must be 0 or more"
    if (value := options.get("max_connections")) is not None and value < 1:
        return "the option max_connections must be 1 or more"
    return None


def _check_redis_url(value: SecretStr) -> SecretStr:
    url = value.get_secret_value()
    if not url.startswith(REDIS_URL_SCHEMES):  # exactly as redis-py checks (case-sensitive)
        raise ValueError(f"a Redis URL must start with {', '.join(REDIS_URL_SCHEMES[:-1])} or {REDIS_URL_SCHEMES[-1]}")
    if problem := _redis_url_problem(url):
        raise ValueError(f"not a Redis URL redis-py can use: {problem}")
    return value


# A Redis URL setting (it may hold a password): refused at load time unless redis-py can parse and use it.
RedisUrl = Annotated[SecretStr, AfterValidator(_check_redis_url)]


def _is_secret(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, SecretStr | SecretBytes):
        return True
    return any(_is_secret(a) for a in get_args(annotation))


def _problem(cls: type[BaseSettings], error: Any) -> str:
    """`<field>: <message> (got <input>)`; the input is left out for a secret field (a Redis URL holds its password)
    and for a check of the whole model (its input is every setting)."""
    if not error["loc"]:
        return str(error["msg"])
    field = cls.model_fields.get(str(error["loc"][0]))
    got = "" if field is None or _is_secret(field.annotation) else f" (got {error.get('input')!r})"
    return f"{'.'.join(str(x) for x in error['loc'])}: {error['msg']}{got}"


@contextlib.contextmanager
def settings_errors(cls: type[BaseSettings], what: str) -> Iterator[None]:
    """Turn a ValidationError / SettingsError of `cls` raised inside into a one-line ConfigError naming `what`."""
    try:
        yield
    except ValidationError as exc:
        problems = "; ".join(_problem(cls, e) for e in exc.errors())
        raise ConfigError(f"invalid {what} settings: {problems}") from exc
    except SettingsError as exc:
        m = re.search(r'field "(\w+)"', str(exc))
        where = f"TAGSTREAM_{m.group(1).upper()}" if m else "a TAGSTREAM_* variable"
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        raise ConfigError(
            f"invalid {what} settings: {where} does not parse{cause}; list settings are JSON, e.g. '[512]'"
        ) from exc


def load_settings(cls: type[S], what: str, **overrides: Any) -> S:
    """`cls()` from the environment with the non-None `overrides` applied; ConfigError naming `what` (e.g. "worker")
    and the field when a value is out of range or a TAGSTREAM_* variable does not parse (e.g. TAGSTREAM_HIDDEN='[a]':
    list settings are JSON)."""
    with settings_errors(cls, what):
        return cls(**{k: v for k, v in overrides.items() if v is not None})
