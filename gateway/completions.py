"""Router events -> OpenAI chat-completion objects, streaming and not.

One builder serves both: it turns each event into the chunks to stream and keeps
what the final (non-streaming) completion needs, so the two shapes cannot drift:
concatenating the streamed deltas gives the non-streaming message.

- Thinking steps -> `reasoning_content` (as vLLM's reasoning parsers and DeepSeek's
  API do), each step's routing in `glimprouter.step` of its chunk.
- Answer -> `content`. A turn with no answer phase (plain instruct models: the steps
  are the reply) gets the router's answer as one content delta at the end.
- `glimprouter`: session id, steps per model, intervention rate, latency, step log.
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict

from gateway.events import AnswerDelta, Done, Event, Started, Step

_THINK_TAGS = re.compile(r"</?think>")
# Why thinking stopped without an answer phase that ends it: the reply was cut.
_CUT = {"budget", "max_steps", "context", "session_steps"}


def reasoning_text(step: Step) -> str:
    # reasoning_content carries the thoughts, not the model's framing tags.
    return _THINK_TAGS.sub("", step.text)


def finish_reason(done: Done) -> str:
    s = done.stats
    if s.answer_end == "length":
        return "length"
    if s.answer_end in ("", "none") and s.thinking_end in _CUT:
        return "length"
    return "stop"


def usage(done: Done) -> dict:
    s = done.stats
    completion = s.thinking_tokens + s.answer_tokens
    return {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": s.prompt_tokens + completion,
        "completion_tokens_details": {"reasoning_tokens": s.thinking_tokens},
    }


def summary(started: Started | None, steps: list[Step], done: Done) -> dict:
    s = done.stats
    return {
        "session_id": done.session_id,
        "turn": started.turn if started else 0,
        "small_model": started.small_model if started else "",
        "large_model": started.large_model if started else "",
        "steps": {"total": s.steps, "small": s.small.steps, "large": s.large.steps},
        "intervention_rate": s.intervention_rate,
        "latency_ms": s.latency_ms,
        "thinking_tokens": s.thinking_tokens,
        "answer_tokens": s.answer_tokens,
        "thinking_end": s.thinking_end,
        "answer_end": s.answer_end,
        "resumed_steps": s.resumed_steps,
        "roles": {"small": asdict(s.small), "large": asdict(s.large)},
        "step_log": [x.routing() for x in steps],
    }


class _Trim:
    """Streams text as `text.strip()` would end up: leading whitespace is dropped and
    trailing whitespace held back until more text follows (the router strips the
    answer it reports, and the streamed answer must add up to it)."""

    def __init__(self) -> None:
        self.started = False
        self.held = ""

    def feed(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = text.rstrip()
        out = (self.held + body) if body else ""
        self.held = (self.held if not body else "") + text[len(body):]
        return out


class CompletionBuilder:
    def __init__(self, completion_id: str, model: str, *, include_usage: bool = False, created: int | None = None) -> None:
        self.id = completion_id
        self.model = model
        self.created = int(time.time()) if created is None else created
        self.include_usage = include_usage
        self.started: Started | None = None
        self.steps: list[Step] = []
        self.done: Done | None = None
        self.answer_streamed = ""
        self._trim = _Trim()

    # ---- streaming -------------------------------------------------------------------
    def _chunk(self, delta: dict, finish: str | None = None, extra: dict | None = None) -> dict:
        c = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        if extra is not None:
            c["glimprouter"] = extra
        return c

    def feed(self, event: Event) -> list[dict]:
        """The chunks this event streams (possibly none)."""
        if isinstance(event, Started):
            self.started = event
            info = {"session_id": event.session_id, "turn": event.turn,
                    "small_model": event.small_model, "large_model": event.large_model}
            return [self._chunk({"role": "assistant", "content": ""}, extra=info)]
        if isinstance(event, Step):
            self.steps.append(event)
            return [self._chunk({"reasoning_content": reasoning_text(event)}, extra={"step": event.routing()})]
        if isinstance(event, AnswerDelta):
            text = self._trim.feed(event.text)
            self.answer_streamed += text
            return [self._chunk({"content": text})] if text else []
        if isinstance(event, Done):
            self.done = event
            out = []
            if not self.answer_streamed and event.answer:
                # No answer phase (the steps are the reply): the answer in one delta.
                self.answer_streamed = event.answer
                out.append(self._chunk({"content": event.answer}))
            out.append(self._chunk({}, finish_reason(event), summary(self.started, self.steps, event)))
            if self.include_usage:
                out.append({**self._chunk({}), "choices": [], "usage": usage(event)})
            return out
        return []

    # ---- the whole completion ----------------------------------------------------------
    def result(self) -> dict:
        if self.done is None:
            raise RuntimeError("the router's stream ended before its done event")
        done = self.done
        reasoning = "".join(reasoning_text(s) for s in self.steps) if self.steps else None
        message = {"role": "assistant", "content": done.answer, "reasoning_content": reasoning}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(done), "logprobs": None}],
            "usage": usage(done),
            "glimprouter": summary(self.started, self.steps, done),
        }
