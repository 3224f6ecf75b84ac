"""Parsing and validating an OpenAI chat-completions body into a ChatRequest.

Plain Python over the decoded JSON: every problem becomes a 400 APIError naming the
offending parameter, so the HTTP layer has nothing to check itself. Range checks
that depend on the router (policy names, policy params, budget limits) are left
to the router, whose INVALID_ARGUMENT comes back as a 400 too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import APIError, bad_request

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
GLIMPSE_MODES = ("fused", "separate")
ENTROPIES = ("top_k", "full")
ANSWER_BY = ("auto", "large", "small", "none")
BUDGET_KEYS = ("step_tokens", "thinking_tokens", "answer_tokens", "max_steps")


@dataclass
class Routing:
    policy: str = ""  # "" = the router's default (glimpse)
    threshold: float | None = None
    params: dict[str, float] = field(default_factory=dict)
    glimpse_mode: str = ""  # "" | fused | separate
    entropy: str = ""  # "" | top_k | full
    top_k: int | None = None


@dataclass
class ChatRequest:
    messages: list[tuple[str, str]] = field(default_factory=list)  # (role, content)
    session_id: str = ""
    routing: Routing = field(default_factory=Routing)
    budgets: dict[str, int] = field(default_factory=dict)  # only the keys the caller set
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    answer_by: str = "auto"
    think: bool | None = None
    stream: bool = False
    include_usage: bool = False
    model: str = ""


# ---- typed field readers: each raises a 400 naming the parameter -------------------
def _is_number(v: Any) -> bool:
    # bool is an int in Python, but `"temperature": true` is a client bug.
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(body: dict, key: str, lo: float | None = None, hi: float | None = None) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if not _is_number(v) or not math.isfinite(v):
        raise bad_request(f"'{key}' must be a finite number, got {v!r}", key, "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad_request(f"'{key}' must be between {lo} and {hi}, got {v!r}", key)
    return float(v)


def _int(body: dict, key: str, lo: int = 0, param: str | None = None, hi: int = 2**31 - 1) -> int | None:
    v = body.get(key)
    param = param or key
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad_request(f"'{param}' must be an integer, got {v!r}", param, "invalid_type")
    if v < lo or v > hi:
        raise bad_request(f"'{param}' must be between {lo} and {hi}, got {v}", param)
    return v


def _bool(body: dict, key: str) -> bool | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise bad_request(f"'{key}' must be a boolean, got {v!r}", key, "invalid_type")
    return v


def _str(body: dict, key: str, choices: tuple[str, ...] | None = None) -> str | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise bad_request(f"'{key}' must be a string, got {v!r}", key, "invalid_type")
    if choices and v not in choices:
        raise bad_request(f"'{key}' must be one of {', '.join(choices)}, got {v!r}", key)
    return v


def _content(msg: dict, i: int) -> str:
    param = f"messages[{i}].content"
    c = msg.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        # The array form: only text parts can reach a text model.
        parts = []
        for part in c:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{param}: only text content parts are supported", param, "invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"{param} must be a string or a list of text parts", param, "invalid_type")


def _messages(body: dict, continuing: bool) -> list[tuple[str, str]]:
    if "messages" not in body or body["messages"] is None:
        raise bad_request("'messages' is required", "messages", "missing_required_parameter")
    raw = body["messages"]
    if not isinstance(raw, list):
        raise bad_request("'messages' must be an array of messages", "messages", "invalid_type")
    if not raw and not continuing:
        raise bad_request("'messages' must not be empty", "messages")
    out = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise bad_request(f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:  # a list or object is not hashable: check the type first
            raise bad_request(
                f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}", f"messages[{i}].role"
            )
        out.append((ROLES[role], _content(msg, i)))
    if continuing:
        # Clients resend the whole conversation; the session already holds it up to
        # its last answer, so only what follows that is the new turn. Nothing new
        # means: resume the session's interrupted turn.
        last_assistant = max((i for i, (r, _) in enumerate(out) if r == "assistant"), default=-1)
        out = out[last_assistant + 1 :]
    return out


def _unsupported(body: dict) -> None:
    n = _int(body, "n", lo=1)
    if n is not None and n != 1:
        raise bad_request("only n=1 is supported", "n")
    if body.get("tools"):
        raise bad_request("tools are not supported", "tools")
    if body.get("logprobs"):
        raise bad_request("logprobs are not supported", "logprobs")
    if body.get("stop"):
        # Steps end at the step boundary; a client stop string has no place in that.
        raise bad_request("stop sequences are not supported", "stop")
    rf = body.get("response_format")
    if rf is not None and (not isinstance(rf, dict) or rf.get("type") != "text"):
        raise bad_request("only response_format {\"type\": \"text\"} is supported", "response_format")


def _routing(body: dict) -> Routing:
    r = Routing()
    r.policy = _str(body, "policy") or ""
    r.threshold = _number(body, "threshold")
    params = body.get("params")
    if params is not None:
        if not isinstance(params, dict) or not all(_is_number(v) for v in params.values()):
            raise bad_request("'params' must be an object of numbers, e.g. {\"p\": 0.3}", "params", "invalid_type")
        r.params = {str(k): float(v) for k, v in params.items()}
    r.glimpse_mode = _str(body, "glimpse_mode", GLIMPSE_MODES) or ""
    r.entropy = _str(body, "entropy", ENTROPIES) or ""
    r.top_k = _int(body, "entropy_top_k", lo=1)
    return r


def _budgets(body: dict) -> dict[str, int]:
    raw = body.get("budgets")
    out: dict[str, int] = {}
    if raw is not None:
        if not isinstance(raw, dict):
            raise bad_request("'budgets' must be an object", "budgets", "invalid_type")
        unknown = sorted(set(raw) - set(BUDGET_KEYS))
        if unknown:
            raise bad_request(
                f"unknown budgets {', '.join(unknown)}; known: {', '.join(BUDGET_KEYS)}", f"budgets.{unknown[0]}"
            )
        for key in BUDGET_KEYS:
            v = _int(raw, key, lo=1, param=f"budgets.{key}")
            if v is not None:
                out[key] = v
    # OpenAI's length cap bounds the answer; thinking has its own budget.
    for key in ("max_completion_tokens", "max_tokens"):
        v = _int(body, key, lo=1)
        if v is not None and "answer_tokens" not in out:
            out["answer_tokens"] = v
    return out


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


def parse_chat_request(body: Any, *, model_name: str, session_id: str = "") -> ChatRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_type")
    bad = _first_unencodable(body, "")
    if bad is not None:
        raise bad_request(f"'{bad}' holds a string that is not valid Unicode (a lone surrogate escape)", bad)
    model = _str(body, "model") or model_name
    if model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this gateway serves {model_name!r}", "model", "model_not_found")
    _unsupported(body)
    req = ChatRequest(model=model, session_id=session_id)
    req.messages = _messages(body, continuing=bool(session_id))
    req.routing = _routing(body)
    req.budgets = _budgets(body)
    req.temperature = _number(body, "temperature", 0.0, 2.0)
    req.top_p = _number(body, "top_p", 0.0, 1.0)
    req.seed = _int(body, "seed", lo=0, hi=2**64 - 1)
    req.answer_by = _str(body, "answer_by", ANSWER_BY) or "auto"
    req.think = _bool(body, "think")
    req.stream = bool(_bool(body, "stream"))
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise bad_request("'stream_options' must be an object", "stream_options", "invalid_type")
        req.include_usage = bool(_bool(so, "include_usage"))
    return req
