"""Configuration errors that name the bad key, from a typed schema's validation errors.

Every config in janus-train (the training run, the data loader) is a pydantic model checked
once; a failure becomes one `ConfigError(key, message)`, printed by the entry points as
`config error: <key>: <message>`.
"""

from __future__ import annotations

from typing import Any



class ConfigError(ValueError):
    """A bad configuration value; `key` is its dotted path (`train.stages.stage1.lr`)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def dotted(loc: tuple[Any, ...], prefix: str = "") -> str:
    """('data', 'und', 0, 'path') -> 'data.und[0].path' (under `prefix`)."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "config"


def unknown_key(where: str = "recipes/config.yaml") -> str:
    return f"unknown key (check the spelling; see {where})"


def _message(err: dict[str, Any], where: str) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return unknown_key(where)
    if kind == "missing":
        return "missing (required)"
    if kind == "value_error":
        # our own validators' messages already say what is wrong and show the value
        return msg.removeprefix("Value error, ")
    if msg.startswith("Input should be "):
        msg = "must be " + msg.removeprefix("Input should be ")
    return f"{msg}, got {err.get('input')!r}"


def from_validation_error(e: Any, prefix: str = "", where: str = "recipes/config.yaml") -> ConfigError:
    """The first error of a pydantic ValidationError as a ConfigError (key under `prefix`;
    `where` documents the keys)."""
    err = e.errors()[0]
    inner = (err.get("ctx") or {}).get("error")
    if isinstance(inner, ConfigError):  # a cross-field check that already knows its key
        return inner
    return ConfigError(dotted(tuple(err["loc"]), prefix), _message(err, where))
