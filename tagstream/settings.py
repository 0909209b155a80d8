"""Loading a service's pydantic Settings from the environment with one-line errors (ConfigError), for every command."""

from __future__ import annotations

import re
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsError

from tagstream.errors import ConfigError

__all__ = ["load_settings"]

S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], what: str, **overrides: Any) -> S:
    """`cls()` from the environment with the non-None `overrides` applied; ConfigError naming `what` (e.g. "worker")
    and the field when a value is out of range or a TAGSTREAM_* variable does not parse (e.g. TAGSTREAM_HIDDEN='[a]':
    list settings are JSON)."""
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors()
        )
        raise ConfigError(f"invalid {what} settings: {problems}") from exc
    except SettingsError as exc:
        m = re.search(r'field "(\w+)"', str(exc))
        where = f"TAGSTREAM_{m.group(1).upper()}" if m else "a TAGSTREAM_* variable"
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        raise ConfigError(
            f"invalid {what} settings: {where} does not parse{cause}; list settings are JSON, e.g. '[512]'"
        ) from exc
