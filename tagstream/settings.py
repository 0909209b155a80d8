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


def _check_redis_url(value: SecretStr) -> SecretStr:
    if not value.get_secret_value().startswith(REDIS_URL_SCHEMES):  # exactly as redis-py checks (case-sensitive)
        raise ValueError(f"a Redis URL must start with {', '.join(REDIS_URL_SCHEMES[:-1])} or {REDIS_URL_SCHEMES[-1]}")
    return value


# A Redis URL setting (it may hold a password): refused at load time unless redis-py can take its scheme.
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
