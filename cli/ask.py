"""`glimprouter ask`: one question through the router's stream, shown as it happens."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO

import grpc

from cli.config import AskSettings
from cli.render import StepText, Style, boxed, started_line, step_head, summary_line
from services.router.api.types import (
    AnswerBy,
    AnswerDelta,
    Budgets,
    Done,
    GlimpseMode,
    Message,
    ReasonRequest,
    RoutingOptions,
    SamplingOptions,
    Started,
    Step,
    StepDelta,
    StepStart,
)


def parse_params(items: tuple[str, ...] | list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise SystemExit(f"--params: expected name=number, got {item!r}") from None
    return out


def build_request(question: str, s: AskSettings) -> ReasonRequest:
    req = ReasonRequest(messages=[Message("user", question)], session_id=s.session)
    params = parse_params(s.params)
    if s.policy or s.threshold is not None or params or s.glimpse_mode:
        req.routing = RoutingOptions(s.policy, s.threshold, params, GlimpseMode(s.glimpse_mode) if s.glimpse_mode else None)
    budgets = Budgets(s.step_tokens, s.thinking_tokens, s.answer_tokens, s.max_steps)
    if budgets != Budgets():
        req.budgets = budgets
    if s.temperature is not None or s.seed is not None:
        req.sampling = SamplingOptions(s.temperature, None, s.seed)
    if s.answer_by != "auto":
        req.answer_by = AnswerBy(s.answer_by)
    return req


@dataclass
class AskResult:
    session_id: str
    done: Done | None


class Printer:
    """Writes events as they come: each step's marker (its writer and entropy) as soon
    as the writer is chosen, then its text token by token, the answer streamed, then
    the summary."""

    def __init__(self, out: TextIO, style: Style) -> None:
        self.out, self.style = out, style
        self.answer_open = False
        self.step: StepText | None = None
        self.t0 = time.monotonic()

    def _print(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def event(self, ev) -> None:
        if isinstance(ev, StepDelta):
            if self.step is not None:
                self._print(self.step.feed(ev.text), end="")
        elif isinstance(ev, StepStart):
            if self.step is not None:  # the step was cut by a worker fault: it starts again
                self._print(self.style(f"  (restarted: attempt {ev.attempt})", "red"))
            self.step = StepText()
            self._print(step_head(ev, self.style), end="")
        elif isinstance(ev, Step):
            self.step = None
            self._print()
        elif isinstance(ev, Started):
            self._print(started_line(ev, self.style))
        elif isinstance(ev, AnswerDelta):
            text = ev.text
            if not self.answer_open:
                self._print(self.style("answer", "bold"))
                self.answer_open = True
                text = text.lstrip()
            self._print(text, end="")
        elif isinstance(ev, Done):
            if self.answer_open:
                self._print()
            elif ev.answer:
                # No answer phase (plain instruct models): the steps are the reply, so
                # repeat only its \\boxed{} result when there is one.
                final = boxed(ev.answer)
                if final is not None:
                    self._print(self.style("answer ", "bold") + final + self.style("  (\\boxed in the steps above)", "dim"))
                else:
                    self._print(self.style("answer", "bold") + self.style(" (the steps above)", "dim"))
                    self._print(ev.answer)
            self._print(summary_line(ev.stats, time.monotonic() - self.t0, self.style))


async def ask(question: str, s: AskSettings, out: TextIO = sys.stdout, style: Style | None = None) -> AskResult:
    """Stream one question; returns the session id. Raises grpc.RpcError on failure."""
    style = style or Style.for_stream(out, s.color)
    client = s.router_client()
    printer = Printer(out, style)
    call = client.reason_stream(build_request(question, s), timeout=s.timeout_s)
    session_id, done = s.session, None
    try:
        async for ev in call:
            if isinstance(ev, Started):
                session_id = ev.session_id
            if isinstance(ev, Done):
                done = ev
            printer.event(ev)
    finally:
        call.cancel()  # Ctrl-C: the router stops the session's work
        await client.close()
    return AskResult(session_id, done)


def describe_rpc_error(exc: grpc.RpcError, target: str) -> str:
    code = exc.code()
    if code is grpc.StatusCode.UNAVAILABLE:
        return f"the router at {target} is not reachable ({exc.details()}); is `glimprouter up` running?"
    return f"{code.name}: {exc.details()}"
