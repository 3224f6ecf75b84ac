"""Router events -> OpenAI chat-completion objects, streaming and not.

One builder serves both: it turns each event into the chunks to stream and keeps
what the final (non-streaming) completion needs, so the two shapes cannot drift:
concatenating the streamed deltas gives the non-streaming message.

Where the text goes (as vLLM does with and without a reasoning parser):
- thinking models (the router's `Started.thinking`): the steps are the thinking ->
  `reasoning_content` (the <think>/</think> tags removed), the answer -> `content`;
- plain instruct models: the steps are the reply -> `content`, and an answer phase
  (answer_by large/small continuing the reply) -> `content` after them.
No text is ever sent twice.

Streaming is per delta: each StepDelta / AnswerDelta the router sends becomes one
chunk, at once (the router forwards what the writer produced since its last
delta). A step's first chunk carries its routing in `glimprouter.step` (writer,
entropy, threshold, attempt); once the step is stored, a chunk with an empty
delta carries `glimprouter.step_done` (its entry of the final `step_log`).

A step restarted after a worker fault (StepStart with attempt > 1): the deltas of
the new attempt that repeat text already sent are skipped (a step is sampled with
the same seed, so a deterministic worker writes the same text again); if the new
attempt differs from what was sent, what was sent cannot be taken back: the
stream continues with the new attempt's text from where the two differ, in a
chunk marked `glimprouter.restart`. The final summary's `step_log`, and the
non-streaming completion, hold only the stored steps.
"""
from __future__ import annotations

import re
import time

from services.router.api.types import AnswerDelta, Done, Event, Started, Step, StepDelta, StepStart, finite_or_none

_THINK_TAGS = re.compile(r"</?think>")
_TAGS = ("<think>", "</think>")
# Why thinking stopped without an answer phase that ends it: the reply was cut.
_CUT = {"budget", "max_steps", "context", "session_steps"}


def reasoning_text(text: str) -> str:
    # reasoning_content carries the thoughts, not the model's framing tags.
    return _THINK_TAGS.sub("", text)


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
        "roles": {"small": vars(s.small), "large": vars(s.large)},
        "step_log": [x.routing() for x in steps],
    }


def step_start(ev: StepStart) -> dict:
    return {
        "index": ev.index, "turn": ev.turn, "model": ev.role.value if ev.role else "", "model_id": ev.model_id,
        "decision": ev.decision.value if ev.decision else "", "entropy": finite_or_none(ev.entropy),
        "threshold": finite_or_none(ev.threshold), "attempt": ev.attempt,
    }


class _Trim:
    """Streams text as `text.strip()` would end up: leading whitespace is dropped and
    trailing whitespace held back until more text follows (the router strips the
    answer it reports, and the streamed content must add up to it)."""

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


class _TagFilter:
    """Removes <think> and </think> from streamed text, holding back the end of a delta
    that may be the start of a tag, so a tag split across deltas is removed too."""

    def __init__(self) -> None:
        self.held = ""

    def feed(self, text: str) -> str:
        buf = self.held + text
        cut = len(buf)
        for k in range(1, len(_TAGS[1])):  # the longest suffix that starts a tag
            tail = buf[-k:]
            if k <= len(buf) and any(t.startswith(tail) and t != tail for t in _TAGS):
                cut = len(buf) - k
        self.held = buf[cut:]
        return _THINK_TAGS.sub("", buf[:cut])

    def flush(self) -> str:
        out, self.held = self.held, ""
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
        self.content_streamed = ""
        self._trim = _Trim()
        self._tags = _TagFilter()
        self._info: dict | None = None  # the current step's routing, not yet sent
        self._sent: dict[int, str] = {}  # per step index: the router's text the client has been sent
        self._replay: tuple[int, str, str] | None = None  # restarted step: (index, text sent, new attempt so far)

    @property
    def thinking(self) -> bool:
        return bool(self.started and self.started.thinking)

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

    def _step_text(self, index: int, text: str, extra: dict | None = None) -> list[dict]:
        """A piece of a step's text, to reasoning_content or content, with the step's
        routing on its first chunk."""
        self._sent[index] = self._sent.get(index, "") + text
        if self.thinking:
            key, text = "reasoning_content", self._tags.feed(text)
        else:
            key, text = "content", self._trim.feed(text)
            self.content_streamed += text
        info = dict(extra or {})
        if self._info is not None:
            info["step"], self._info = self._info, None
        if not text and not info:
            return []
        return [self._chunk({key: text} if text else {}, extra=info or None)]

    def feed(self, event: Event) -> list[dict]:
        """The chunks this event streams (possibly none)."""
        if isinstance(event, StepDelta):
            if self._replay is not None and self._replay[0] == event.index:
                return self._replayed(event.text)
            return self._step_text(event.index, event.text)
        if isinstance(event, StepStart):
            self._info = step_start(event)
            sent = self._sent.get(event.index, "")
            self._replay = (event.index, sent, "") if event.attempt > 1 and sent else None
            return []
        if isinstance(event, Step):
            self.steps.append(event)
            out = self._replay_end() if self._replay is not None and self._replay[0] == event.index else []
            if self.thinking and (rest := self._tags.flush()):  # an unfinished "<thi" at the step's end is text
                out.append(self._chunk({"reasoning_content": rest}))
            # The step is stored: its routing and counts (what step_log will list).
            extra = {"step_done": event.routing()}
            if self._info is not None:  # a step with no text: its start goes out here
                extra["step"], self._info = self._info, None
            out.append(self._chunk({}, extra=extra))
            return out
        if isinstance(event, AnswerDelta):
            text = self._trim.feed(event.text)
            self.content_streamed += text
            return [self._chunk({"content": text})] if text else []
        if isinstance(event, Started):
            self.started = event
            info = {"session_id": event.session_id, "turn": event.turn,
                    "small_model": event.small_model, "large_model": event.large_model}
            return [self._chunk({"role": "assistant", "content": ""}, extra=info)]
        if isinstance(event, Done):
            self.done = event
            out = [self._chunk({}, finish_reason(event), summary(self.started, self.steps, event))]
            if self.include_usage:
                out.append({**self._chunk({}), "choices": [], "usage": usage(event)})
            return out
        return []

    def _replayed(self, text: str) -> list[dict]:
        """A delta of a restarted step: what the client already has is skipped."""
        index, sent, fresh = self._replay
        fresh += text
        if sent.startswith(fresh):
            self._replay = (index, sent, fresh)
            return []
        self._replay = None
        common = 0
        while common < min(len(sent), len(fresh)) and sent[common] == fresh[common]:
            common += 1
        extra = None
        if common < len(sent):  # the new attempt differs from what was sent, which cannot be taken back
            extra = {"restart": {"index": index, "diverged_at": common}}
        return self._step_text(index, fresh[common:], extra)

    def _replay_end(self) -> list[dict]:
        """A restarted step ended inside the text already sent: the new attempt is shorter."""
        index, sent, fresh = self._replay
        self._replay = None
        return [] if fresh == sent else [self._chunk({}, extra={"restart": {"index": index, "diverged_at": len(fresh)}})]

    # ---- the whole completion ----------------------------------------------------------
    def result(self) -> dict:
        if self.done is None:
            raise RuntimeError("the router's stream ended before its done event")
        done = self.done
        reasoning = None
        if self.thinking and self.steps:
            reasoning = "".join(reasoning_text(s.text) for s in self.steps)
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
