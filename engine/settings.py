"""Where serve settings come from: defaults < ringserve.toml < RINGSERVE_* environment < flags.

Every ServeConfig field is settable everywhere under one name: ``max_streams`` in the file,
``RINGSERVE_MAX_STREAMS`` in the environment, ``--max-streams`` on the command line.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from typing import Any

from engine.config import ConfigError, ServeConfig

ENV_PREFIX = "RINGSERVE_"
# RINGSERVE_* variables that are not serve settings: the corpus/test audio locations, the
# fuzz test's replay seed (the daemons it spawns inherit it), and the tuned file
# `serve --workers auto` reads (see auto_workers).
TUNED_ENV = ENV_PREFIX + "TUNED"
NOT_SETTINGS = frozenset({"RINGSERVE_AUDIO_DIR", "RINGSERVE_SHARED_AUDIO", "RINGSERVE_FUZZ_SEED", TUNED_ENV})
_HINTS = typing.get_type_hints(ServeConfig)
FIELDS = {f.name: f for f in dataclasses.fields(ServeConfig)}


def _kind(name: str) -> str:
    hint = _HINTS[name]
    if hint in (int, float, str, bool):
        return hint.__name__
    if hint == tuple[str, ...]:
        return "list"
    return "str"  # str | None (model)


def coerce(name: str, value: Any, source: str) -> Any:
    """Convert a file/env value to the field's type, or raise naming key, source and type."""
    kind = _kind(name)
    try:
        if kind == "list":
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return tuple(value)
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind == "bool":
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if not isinstance(value, str):
            raise TypeError
        return value
    except (TypeError, ValueError):
        expected = {"list": "a list of strings", "int": "an integer", "float": "a number", "str": "a string",
                    "bool": "true or false"}[kind]
        raise ConfigError(f"{source}: key '{name}' must be {expected}, got {value!r}") from None


def read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    table = data.get("serve", data)  # `ringserve tune` writes a [serve] table; a flat file works too
    extra = set(data) - {"serve", "tune"} if "serve" in data else set()
    unknown = (set(table) - set(FIELDS)) | extra
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; known keys: {', '.join(FIELDS)}")
    return {name: coerce(name, value, path) for name, value in table.items()}


def read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key in NOT_SETTINGS:
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in FIELDS:
            raise ConfigError(f"environment variable {key} is not a setting; known: "
                              f"{', '.join(ENV_PREFIX + n.upper() for n in FIELDS)}")
        values[name] = coerce(name, raw, f"environment variable {key}")
    return values


def auto_workers(environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """`--workers auto`: the workers of the file `ringserve tune` wrote ($RINGSERVE_TUNED, else
    ./ringserve.toml), else the CPU count; and a phrase saying which, for the log."""
    environ = os.environ if environ is None else environ
    path = environ.get(TUNED_ENV) or ("ringserve.toml" if os.path.isfile("ringserve.toml") else None)
    cpus = os.cpu_count() or 1
    if path is None:
        return cpus, f"the CPU count ({cpus}): no ./ringserve.toml and no ${TUNED_ENV}"
    source = f"${TUNED_ENV}={path}" if environ.get(TUNED_ENV) else f"./{path}"
    try:
        values = read_file(path)  # a missing or bad file is an error, never a silent fallback
        ServeConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"--workers auto reads {source}: {exc}") from None
    if "workers" not in values:
        return cpus, f"the CPU count ({cpus}): {source} sets no workers"
    return int(values["workers"]), f"the tuned file {source}"


def build_config(flags: Mapping[str, Any], config_path: str | None,
                 environ: Mapping[str, str] | None = None) -> tuple[ServeConfig, dict[str, str]]:
    """The effective config and, per key, where its value came from."""
    merged: dict[str, Any] = {}
    origin = {name: "default" for name in FIELDS}
    layers = [(read_file(config_path), config_path)] if config_path else []
    layers += [(read_env(os.environ if environ is None else environ), "environment"), (dict(flags), "flag")]
    for values, source in layers:
        for name, value in values.items():
            merged[name] = value
            origin[name] = str(source)
    try:
        return ServeConfig(**merged), origin
    except ConfigError as exc:
        raise ConfigError(f"{exc} (set by {', '.join(sorted({origin[k] for k in merged}))})") from None


def to_toml(cfg: ServeConfig, origin: Mapping[str, str] | None = None) -> str:
    lines = ["[serve]"]
    for name, value in cfg.to_dict().items():
        if value is None:
            lines.append(f"# {name} = (default)")
            continue
        text = ("[" + ", ".join(f'"{v}"' for v in value) + "]" if isinstance(value, list)
                else f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool)
                else repr(value))
        note = f"  # from {origin[name]}" if origin and origin.get(name, "default") != "default" else ""
        lines.append(f"{name} = {text}{note}")
    return "\n".join(lines) + "\n"
