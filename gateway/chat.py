"""An OpenAI chat-completions body -> the router's ReasonRequest (services.router.api).

The body is read by declared pydantic models (strict: `"temperature": "0.5"` or
`true` is a client bug, not a number); every problem becomes a 400 APIError in
OpenAI's format naming the offending parameter (`messages[0].role`,
`budgets.max_steps`). Range checks that depend on the router (policy names and
parameters, top_k, budget limits) are left to the router, whose INVALID_ARGUMENT
comes back as a 400 too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from gateway.errors import APIError, bad_request
from services.router.api.types import (
    AnswerBy,
    Budgets,
    CatchUp,
    Entropy,
    GlimpseMode,
    Message,
    ReasonRequest,
    RoutingOptions,
    SamplingOptions,
)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
BUDGET_KEYS = ("step_tokens", "thinking_tokens", "answer_tokens", "max_steps")
INT32 = 2**31 - 1


def _text_content(v: Any) -> Any:
    """A string, or the array form with only text parts (only text reaches a text model)."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in v):
        return "".join(p["text"] for p in v)
    raise PydanticCustomError("content_type", "must be a string or a list of text parts (only text content is supported)")


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, BeforeValidator(_text_content)]


class _Budgets(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    step_tokens: int | None = Field(None, ge=1, le=INT32)
    thinking_tokens: int | None = Field(None, ge=1, le=INT32)
    answer_tokens: int | None = Field(None, ge=1, le=INT32)
    max_steps: int | None = Field(None, ge=1, le=INT32)


class _StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool | None = None


class ChatBody(BaseModel):
    """The fields of OpenAI's body the gateway reads, and GlimpRouter's extra ones
    (top level, `extra_body` in the OpenAI client). Anything else is ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")
    messages: list[_Message]
    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    max_tokens: int | None = Field(None, ge=1, le=INT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32)
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=INT32)
    tools: Any = None
    logprobs: Any = None
    stop: Any = None
    response_format: Any = None
    # GlimpRouter's
    policy: str | None = None
    threshold: float | None = Field(None, allow_inf_nan=False)
    params: dict[str, float] | None = None  # NaN passes here; the router refuses it naming the parameter
    glimpse_mode: Literal["fused", "separate"] | None = None
    catch_up: Literal["eager", "lazy"] | None = None
    entropy: Literal["top_k", "full"] | None = None
    entropy_top_k: int | None = Field(None, ge=1, le=INT32)
    budgets: _Budgets | None = None
    answer_by: Literal["auto", "large", "small", "none"] | None = None
    think: bool | None = None


@dataclass
class ChatRequest:
    """What one chat completion asks for: the router's request and how to answer."""

    reason: ReasonRequest = field(default_factory=ReasonRequest)
    stream: bool = False
    include_usage: bool = False
    model: str = ""


# ---- errors ----------------------------------------------------------------------------------
def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _error(e: dict) -> APIError:
    loc, kind, value = e["loc"], e["type"], e.get("input")
    if loc and loc[0] == "params":
        return bad_request("'params' must be an object of numbers, e.g. {\"p\": 0.3}", "params", "invalid_type")
    param = _param(loc)
    if kind == "missing":
        return bad_request(f"'{param}' is required", param, "missing_required_parameter")
    if kind == "extra_forbidden" and loc[0] == "budgets":
        return bad_request(f"unknown budgets {loc[-1]}; known: {', '.join(BUDGET_KEYS)}", param)
    if kind == "list_type" and param == "messages":
        return bad_request("'messages' must be an array of messages", param, "invalid_type")
    if kind in ("model_type", "model_attributes_type") and param.startswith("messages["):
        return bad_request(f"{param} must be an object", param, "invalid_type")
    if kind == "finite_number":
        return bad_request(f"'{param}' must be a finite number, got {value!r}", param, "invalid_type")
    if kind == "content_type":
        return bad_request(f"{param} {e['msg']}", param, "invalid_type")
    if kind.endswith("_type") or kind in ("model_type", "model_attributes_type", "dict_type"):
        return bad_request(f"'{param}' has the wrong type: {e['msg'].lower()}, got {value!r}"[:300], param, "invalid_type")
    if kind in ("enum", "literal_error"):
        return bad_request(f"'{param}' {e['msg'].lower().replace('input should be', 'must be')}, got {value!r}"[:300], param)
    return bad_request(f"'{param}': {e['msg'].lower()}, got {value!r}"[:300], param)


def _first_unencodable(value: Any, path: str) -> str | None:
    """Where a string that is not valid Unicode sits (JSON's "\\ud800" escapes decode
    to lone surrogates, which no UTF-8 encoder, protobuf's included, accepts)."""
    stack = [(value, path)]
    while stack:
        v, p = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return p or "body"
        elif isinstance(v, dict):
            for k, item in v.items():
                stack.append((k, p or "body"))
                stack.append((item, f"{p}.{k}" if p else str(k)))
        elif isinstance(v, list):
            stack.extend((item, f"{p}[{i}]") for i, item in enumerate(v))
    return None


def _unsupported(b: ChatBody) -> None:
    if b.n is not None and b.n != 1:
        raise bad_request("only n=1 is supported", "n")
    if b.tools:
        raise bad_request("tools are not supported", "tools")
    if b.logprobs:
        raise bad_request("logprobs are not supported", "logprobs")
    if b.stop:
        # Steps end at the step boundary; a client stop string has no place in that.
        raise bad_request("stop sequences are not supported", "stop")
    rf = b.response_format
    if rf is not None and (not isinstance(rf, dict) or rf.get("type") != "text"):
        raise bad_request("only response_format {\"type\": \"text\"} is supported", "response_format")


# ---- the body -> the router's request -----------------------------------------------------------
def parse_chat_request(body: Any, *, model_name: str, session_id: str = "") -> ChatRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_type")
    bad = _first_unencodable(body, "")
    if bad is not None:
        raise bad_request(f"'{bad}' holds a string that is not valid Unicode (a lone surrogate escape)", bad)
    if body.get("messages") is None:
        raise bad_request("'messages' is required", "messages", "missing_required_parameter")
    try:
        b = ChatBody.model_validate(body)
    except ValidationError as exc:
        raise _error(exc.errors()[0]) from None
    model = b.model or model_name
    if model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this gateway serves {model_name!r}", "model", "model_not_found")
    _unsupported(b)
    messages = [Message(ROLES[m.role], m.content) for m in b.messages]
    if session_id:
        # Clients resend the whole conversation; the session already holds it up to
        # its last answer, so only what follows that is the new turn. Nothing new
        # means: resume the session's interrupted turn.
        last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
        messages = messages[last + 1:]
    elif not messages:
        raise bad_request("'messages' must not be empty", "messages")
    req = ReasonRequest(messages=messages, session_id=session_id, think=b.think)
    # Only groups the caller set are sent: on a continued session the router keeps
    # the stored options of every group left out.
    if any(x is not None for x in (b.policy, b.threshold, b.params, b.glimpse_mode, b.entropy, b.entropy_top_k,
                                   b.catch_up)):
        req.routing = RoutingOptions(b.policy or "", b.threshold, dict(b.params or {}),
                                     GlimpseMode(b.glimpse_mode) if b.glimpse_mode else None,
                                     Entropy(b.entropy) if b.entropy else None, b.entropy_top_k,
                                     CatchUp(b.catch_up) if b.catch_up else None)
    budgets = b.budgets.model_dump() if b.budgets is not None else {}
    # OpenAI's length cap bounds the answer; thinking has its own budget.
    if budgets.get("answer_tokens") is None:
        budgets["answer_tokens"] = b.max_completion_tokens or b.max_tokens
    if any(v is not None for v in budgets.values()):
        req.budgets = Budgets(**budgets)
    if any(x is not None for x in (b.temperature, b.top_p, b.seed)):
        req.sampling = SamplingOptions(b.temperature, b.top_p, b.seed)
    if b.answer_by not in (None, "auto"):
        req.answer_by = AnswerBy(b.answer_by)
    include_usage = bool(b.stream_options and b.stream_options.include_usage)
    return ChatRequest(req, bool(b.stream), include_usage, model)
