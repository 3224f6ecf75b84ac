"""`glimprouter ask`: one question through the router's stream, shown as it happens."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO

import grpc

from cli.config import AskSettings
from cli.render import Style, boxed, started_line, step_block, summary_line
from gateway.chat import ChatRequest, Routing
from gateway.events import AnswerDelta, Done, Started, Step


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


def build_request(question: str, s: AskSettings) -> ChatRequest:
    budgets = {k: getattr(s, k) for k in ("step_tokens", "thinking_tokens", "answer_tokens", "max_steps")
               if getattr(s, k) is not None}
    return ChatRequest(
        messages=[("user", question)],
        session_id=s.session,
        routing=Routing(policy=s.policy, threshold=s.threshold, params=parse_params(s.params), glimpse_mode=s.glimpse_mode),
        budgets=budgets,
        temperature=s.temperature,
        seed=s.seed,
        answer_by=s.answer_by,
    )


@dataclass
class AskResult:
    session_id: str
    done: Done | None


class Printer:
    """Writes events as they come: steps with their model and entropy, the answer
    streamed, then the summary."""

    def __init__(self, out: TextIO, style: Style) -> None:
        self.out, self.style = out, style
        self.answer_open = False
        self.t0 = time.monotonic()

    def _print(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def event(self, ev) -> None:
        if isinstance(ev, Started):
            self._print(started_line(ev, self.style))
        elif isinstance(ev, Step):
            self._print(step_block(ev, self.style))
        elif isinstance(ev, AnswerDelta):
            if not self.answer_open:
                self._print(self.style("answer", "bold"))
                self.answer_open = True
                ev = AnswerDelta(ev.text.lstrip(), ev.role)
            self._print(ev.text, end="")
        elif isinstance(ev, Done):
            if self.answer_open:
                self._print()
            elif ev.answer:
                # No answer phase (plain instruct models): the steps are the reply, so
                # repeat only its \boxed{} result when there is one.
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
        async for ev in client.events(call):
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
