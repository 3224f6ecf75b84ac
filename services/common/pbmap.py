"""Protobuf <-> dataclass mapping, generic over fields, written once for every contract.

A dataclass maps to the message with the same field names; each contract's
protomap module (services/worker/protomap.py, services/router/api/protomap.py)
uses these and writes by hand only what does not match by name.

- Enums map by member name: `Role.SMALL` <-> `ROLE_SMALL` (the prefix protobuf
  style puts on every value is the enum's name in upper snake case). A field
  typed `X | None` maps None <-> the `_UNSPECIFIED` value.
- Nested dataclasses <-> sub-messages, lists <-> repeated fields, dicts <-> maps.
- A field typed `... | None` is None when the message does not have it (proto3
  `optional` and sub-message presence), and is left unset when it is None.

The plan for each (dataclass, message) pair is worked out once from the type
hints and cached, so mapping a message costs one pass over its fields.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import re
import types
import typing
from typing import Any, Callable, TypeVar

E = TypeVar("E", bound=enum.Enum)
D = TypeVar("D")


# ---- enums ---------------------------------------------------------------------------------
def _enum_prefix(pb_enum) -> str:
    """FinishReason -> FINISH_REASON; takes an EnumTypeWrapper or an EnumDescriptor."""
    name = getattr(pb_enum, "DESCRIPTOR", pb_enum).name
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


@functools.lru_cache(maxsize=None)
def _enum_tables(cls: type[enum.Enum], descriptor) -> tuple[dict, dict]:
    prefix = _enum_prefix(descriptor) + "_"
    by_number = {v.number: v.name[len(prefix):] for v in descriptor.values}
    to_pb = {m: descriptor.values_by_name[prefix + m.name].number for m in cls if prefix + m.name in descriptor.values_by_name}
    from_pb = {n: cls[name] for n, name in by_number.items() if name in cls.__members__}
    return to_pb, from_pb


def enum_to_pb(member: enum.Enum | None, pb_enum) -> int:
    if member is None:
        return 0
    return _enum_tables(type(member), pb_enum.DESCRIPTOR)[0][member]


def enum_from_pb(cls: type[E], pb_enum, value: int, default: E | None = None) -> E | None:
    """The member named like `value`; `default` for UNSPECIFIED and numbers this code does not know."""
    out = _enum_tables(cls, pb_enum.DESCRIPTOR)[1].get(value)
    return default if out is None else out


# ---- flat dataclasses (every field a plain value of the same name) ----------------------------
@functools.lru_cache(maxsize=None)
def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def flat_to_pb(obj, msg_cls):
    return msg_cls(**{name: getattr(obj, name) for name in _names(type(obj))})


def flat_from_pb(cls: type[D], msg) -> D:
    return cls(*[getattr(msg, name) for name in _names(cls)])


# ---- nested dataclasses ---------------------------------------------------------------------------
def _unwrap(hint) -> tuple[Any, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else hint), len(args) < len(typing.get_args(hint))
    return hint, False


def _is_dataclass_type(t) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _is_enum_type(t) -> bool:
    return isinstance(t, type) and issubclass(t, enum.Enum)


@functools.lru_cache(maxsize=None)
def _to_plan(cls: type, descriptor) -> tuple:
    hints = typing.get_type_hints(cls)
    plan = []
    for f in dataclasses.fields(cls):
        fd = descriptor.fields_by_name.get(f.name)
        if fd is None:
            continue  # a field the message does not carry
        t, _ = _unwrap(hints[f.name])
        args = typing.get_args(t)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            plan.append((f.name, "map", None))
        elif _is_enum_type(t):
            plan.append((f.name, "enum", _enum_tables(t, fd.enum_type)[0]))
        elif _is_dataclass_type(t):
            plan.append((f.name, "message", (t, fd.message_type)))
        elif args and _is_dataclass_type(args[0]):
            plan.append((f.name, "messages", (args[0], fd.message_type)))
        elif args and _is_enum_type(args[0]):
            plan.append((f.name, "enums", _enum_tables(args[0], fd.enum_type)[0]))
        else:
            plan.append((f.name, "value", None))
    return tuple(plan)


def to_kwargs(obj, descriptor) -> dict:
    """The keyword arguments of the message `descriptor` for dataclass `obj` (None fields left out)."""
    out = {}
    for name, kind, extra in _to_plan(type(obj), descriptor):
        v = getattr(obj, name)
        if v is None:
            continue
        if kind == "value" or kind == "map":
            out[name] = v
        elif kind == "enum":
            out[name] = extra[v]
        elif kind == "message":
            out[name] = to_kwargs(v, extra[1])
        elif kind == "messages":
            out[name] = [to_kwargs(x, extra[1]) for x in v]
        else:  # enums
            out[name] = [extra[x] for x in v]
    return out


def to_pb(obj, msg_cls):
    """A dataclass as the message of the same shape (sub-messages built from dicts)."""
    return msg_cls(**to_kwargs(obj, msg_cls.DESCRIPTOR))


@functools.lru_cache(maxsize=None)
def _from_plan(cls: type, descriptor) -> tuple:
    hints = typing.get_type_hints(cls)
    plan: list[tuple[str, Callable[[Any], Any]]] = []
    for f in dataclasses.fields(cls):
        fd = descriptor.fields_by_name.get(f.name)
        if fd is None:
            continue  # the dataclass default stands
        t, optional = _unwrap(hints[f.name])
        args = typing.get_args(t)
        name = f.name
        presence = optional and fd.has_presence and not fd.is_repeated
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            conv = dict
        elif _is_enum_type(t):
            table = _enum_tables(t, fd.enum_type)[1]
            default = None if optional else (f.default if f.default is not dataclasses.MISSING else None)
            conv = functools.partial(_lookup, table, default)
        elif _is_dataclass_type(t):
            conv = functools.partial(from_pb, t)
        elif args and _is_dataclass_type(args[0]):
            conv = functools.partial(_many, args[0])
        elif args and _is_enum_type(args[0]):
            conv = functools.partial(_enums, _enum_tables(args[0], fd.enum_type)[1])
        elif fd.is_repeated:
            conv = tuple if typing.get_origin(t) is tuple else list
        else:
            conv = None
        plan.append((name, conv, presence))
    return tuple(plan)


def _lookup(table: dict, default, value: int):
    out = table.get(value)
    return default if out is None else out


def _many(cls: type, msgs) -> list:
    return [from_pb(cls, m) for m in msgs]


def _enums(table: dict, values) -> list:
    return [table[v] for v in values if v in table]


def from_pb(cls: type[D], msg) -> D:
    """The dataclass `cls` from a message of the same shape."""
    kwargs = {}
    for name, conv, presence in _from_plan(cls, msg.DESCRIPTOR):
        if presence and not msg.HasField(name):
            kwargs[name] = None
            continue
        v = getattr(msg, name)
        kwargs[name] = v if conv is None else conv(v)
    return cls(**kwargs)
