"""One place for configuration: each setting is a dataclass field that is both a
command-line flag and an environment variable with the same name.

`--redis-url` is read from `GLIMPROUTER_REDIS_URL` when the flag is absent. Flags win
over the environment, the environment wins over the field default. Each service
declares its settings as a dataclass and calls `load(SettingsClass, argv)`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, Sequence, TypeVar

ENV_PREFIX = "GLIMPROUTER_"

T = TypeVar("T")


def setting(default: Any, help: str, *, choices: Sequence[str] | None = None, secret: bool = False) -> Any:
    """A settings field. `secret` values are never printed by `describe`."""
    return dataclasses.field(
        default=default, metadata={"help": help, "choices": choices, "secret": secret}
    )


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _converter(tp: Any):
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _converter(args[0])
    if origin in (list, tuple):
        return lambda text: [part.strip() for part in text.split(",") if part.strip()]
    raise TypeError(f"unsupported settings type {tp!r}")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        meta = field.metadata
        default = field.default if field.default is not dataclasses.MISSING else None
        is_bool = hints[field.name] is bool
        parser.add_argument(
            flag_name(field.name),
            dest=field.name,
            default=None,
            type=str,
            # A bare `--demo` means true; `--demo false` still works.
            nargs="?" if is_bool else None,
            const="true" if is_bool else None,
            choices=meta.get("choices"),
            metavar=field.name.upper() if not meta.get("choices") else None,
            help=f"{meta.get('help', '')} [env {env_name(field.name)}; default {default!r}]",
        )


def from_namespace(cls: type[T], namespace: argparse.Namespace | None, environ: dict[str, str] | None = None) -> T:
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        raw = getattr(namespace, field.name, None) if namespace is not None else None
        source = flag_name(field.name)
        if raw is None and env_name(field.name) in environ:
            raw = environ[env_name(field.name)]
            source = env_name(field.name)
        if raw is None:
            continue
        try:
            values[field.name] = _converter(hints[field.name])(raw)
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"invalid value for {source}: {raw!r} ({exc})") from None
        choices = field.metadata.get("choices")
        if choices and values[field.name] not in choices:
            raise SystemExit(f"invalid value for {source}: {raw!r} (choose from {', '.join(choices)})")
    return cls(**values)


def load(cls: type[T], argv: Sequence[str] | None = None, *, prog: str | None = None, description: str = "") -> T:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser, cls)
    return from_namespace(cls, parser.parse_args(argv))


def describe(obj: Any) -> dict[str, Any]:
    """Settings as a dict for startup logs, with secrets masked."""
    out = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        out[field.name] = "***" if field.metadata.get("secret") and value else value
    return out
