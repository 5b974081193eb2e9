"""One frozen settings object per program, loaded with one precedence rule:

    command-line flags  >  LLAMAFLEET_* environment variables  >  TOML config file  >  defaults

A settings class is a frozen dataclass whose fields are declared with `setting(...)`; the field
name is the TOML key, and `LLAMAFLEET_<NAME>` (upper case) the environment variable. A field may
also read another program's variable (`fallback_env`, e.g. Ollama's OLLAMA_ORIGINS) when its own
is not set: an environment variable still, so above the TOML file, below LLAMAFLEET_<NAME>.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from llamafleet.common.errors import UsageError

ENV_PREFIX = "LLAMAFLEET_"
T = TypeVar("T")
Parser = Callable[[Any], Any]


def split_host_port(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 hosts in brackets) as (host, port); ValueError when it is not one."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"'{text}' is not HOST:PORT")
    return host.strip("[]"), int(port)


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"'{value}' is not a boolean (true/false)")


def parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"'{value}' is not an integer")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"'{value}' is not an integer") from None


def parse_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"'{value}' is not a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"'{value}' is not a number") from None


def parse_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"'{value}' is not a string")
    return value


def parse_path(value: Any) -> Path | None:
    if value is None or value == "":
        return None
    if not isinstance(value, (str, Path)):
        raise ValueError(f"'{value}' is not a path")
    return Path(value).expanduser()


def parse_list(value: Any) -> tuple[str, ...]:
    """A TOML array, repeated flags, or a comma-separated string."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ValueError(f"'{value}' is not a list of strings")


_DEFAULT_PARSERS: dict[type, Parser] = {
    bool: parse_bool, int: parse_int, float: parse_float, str: parse_str, tuple: parse_list,
}


def setting(default: Any, *, parse: Parser | None = None, help: str = "", flag: str = "",
            repeat: bool = False, fallback_env: tuple[str, ...] = ()) -> Any:
    """Declare a settings field; `parse` turns a TOML/env/flag value into the field's type.

    The command-line flag is `--<name-with-dashes>` unless `flag` names another; `repeat`
    makes it repeatable (`--agent A --agent B`) instead of comma-separated. `fallback_env`:
    variables read, in order, when LLAMAFLEET_<NAME> is not set.
    """
    chosen = parse or _DEFAULT_PARSERS.get(type(default))
    if chosen is None:
        raise TypeError(f"no parser for default {default!r}: pass parse=")
    return dataclasses.field(default=default, metadata={"parse": chosen, "help": help, "flag": flag,
                                                        "repeat": repeat, "fallback_env": fallback_env})


def flag_name(field: dataclasses.Field[Any]) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None


def load_settings(
    cls: type[T],
    *,
    flags: Mapping[str, Any],
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Build `cls` from flags (None = not given), env, the TOML file and defaults."""
    environ = os.environ if environ is None else environ
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    raw: dict[str, tuple[Any, str]] = {}
    if config_file is not None:
        for key, value in _read_toml(config_file).items():
            if key not in fields:
                raise UsageError(f"unknown key '{key}' in config file {config_file}")
            raw[key] = (value, f"config file {config_file}")
    for name, field in fields.items():
        for variable in (env_name(name), *field.metadata.get("fallback_env", ())):
            if (value := environ.get(variable)) is not None:
                raw[name] = (value, variable)
                break
    for name, value in flags.items():
        if value is not None and value != ():
            raw[name] = (value, flag_name(fields[name]))
    values = {}
    for name, (value, origin) in raw.items():
        try:
            values[name] = fields[name].metadata["parse"](value)
        except (ValueError, UsageError) as exc:
            # The operator's typo becomes one line naming where the bad value came from.
            raise UsageError(f"invalid {name} from {origin}: {exc}") from None
    try:
        return cls(**values)
    except ValueError as exc:
        # __post_init__ cross-field checks speak in ValueError; present them the same way.
        raise UsageError(str(exc)) from None
