"""router.proto <-> the router's public types (types.py), both directions, in one place:
the router's servicer reads requests and writes events with it, the client reads
events and writes requests with it. Everything that matches by field name goes
through services/common/pbmap.py; this module only says which message is which."""
from __future__ import annotations

from glimprouter.v1 import router_pb2 as pb
from services.common import pbmap
from services.router.api.types import (
    AnswerDelta,
    Done,
    Event,
    Message,
    ReasonRequest,
    SessionInfo,
    Started,
    Stats,
    Step,
    StepDelta,
    StepStart,
)

# event dataclass -> (ReasonEvent oneof field, its message class)
_EVENTS: dict[type, tuple[str, type]] = {
    Started: ("started", pb.SessionStarted),
    StepStart: ("step_start", pb.StepStart),
    StepDelta: ("step_delta", pb.StepDelta),
    Step: ("step", pb.StepEvent),
    AnswerDelta: ("answer", pb.AnswerDelta),
    Done: ("done", pb.Done),
}
_FROM_FIELD = {name: cls for cls, (name, _) in _EVENTS.items()}
_DESCRIPTORS = {cls: msg.DESCRIPTOR for cls, (_, msg) in _EVENTS.items()}


# ---- requests: caller -> router ----------------------------------------------------------------
def request_to_pb(r: ReasonRequest) -> pb.ReasonRequest:
    return pbmap.to_pb(r, pb.ReasonRequest)


def _check_enums(msg, path: str = "") -> None:
    """Enum numbers this code does not know are refused, never read as "unspecified"
    (a newer client's value, or garbage)."""
    for fd, value in msg.ListFields():
        name = f"{path}{fd.name}"
        if fd.enum_type is not None and not fd.is_repeated and fd.enum_type.values_by_number.get(value) is None:
            known = ", ".join(v.name for v in fd.enum_type.values[1:])
            raise ValueError(f"{name}: unknown value {value} (use one of {known})")
        if fd.message_type is not None and not fd.is_repeated and not fd.message_type.GetOptions().map_entry:
            _check_enums(value, name + ".")


def request_from_pb(r: pb.ReasonRequest) -> ReasonRequest:
    """Raises ValueError (INVALID_ARGUMENT) for enum values this router does not know."""
    _check_enums(r)
    req = pbmap.from_pb(ReasonRequest, r)
    if r.prompt:  # the shorthand: one more user message
        req.messages.append(Message("user", r.prompt))
    return req


# ---- events: router -> caller --------------------------------------------------------------------
def event_to_pb(ev: Event) -> pb.ReasonEvent:
    name, _ = _EVENTS[type(ev)]
    return pb.ReasonEvent(**{name: pbmap.to_kwargs(ev, _DESCRIPTORS[type(ev)])})


def event_from_pb(ev: pb.ReasonEvent) -> Event | None:
    """None for an event kind newer than this code (callers skip it)."""
    name = ev.WhichOneof("event")
    cls = _FROM_FIELD.get(name) if name else None
    return pbmap.from_pb(cls, getattr(ev, name)) if cls else None


def step_to_pb(s: Step) -> pb.StepEvent:
    return pbmap.to_pb(s, pb.StepEvent)


def stats_to_pb(s: Stats) -> pb.Stats:
    return pbmap.to_pb(s, pb.Stats)


def stats_from_pb(s: pb.Stats) -> Stats:
    return pbmap.from_pb(Stats, s)


# ---- sessions -------------------------------------------------------------------------------------
def session_to_pb(s: SessionInfo) -> pb.Session:
    return pbmap.to_pb(s, pb.Session)


def session_from_pb(s: pb.Session) -> SessionInfo:
    return pbmap.from_pb(SessionInfo, s)
