"""How the CLI shows steps, answers, summaries and session tables: plain functions
from events to text, so the output is testable without a terminal or a router."""
from __future__ import annotations

import math
import os
import sys
from typing import TextIO

from services.router.api.types import SessionInfo, Started, Stats, Step, StepStart

_CODES = {"small": "36", "large": "1;35", "dim": "2", "bold": "1", "red": "31", "green": "32"}


class Style:
    """ANSI colour only when asked or when writing to a terminal (and NO_COLOR is unset)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @classmethod
    def for_stream(cls, stream: TextIO, mode: str = "auto") -> "Style":
        if mode == "always":
            return cls(True)
        if mode == "never":
            return cls(False)
        return cls(stream.isatty() and "NO_COLOR" not in os.environ)

    def __call__(self, text: str, name: str) -> str:
        return f"\x1b[{_CODES[name]}m{text}\x1b[0m" if self.enabled and text else text


def fmt_float(value: float, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces matched), the paper's answer marker."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{") - 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None


def started_line(ev: Started, style: Style) -> str:
    resumed = f" · resumed {ev.resumed_steps} steps" if ev.resumed_steps else ""
    return (style(f"session {ev.session_id}", "bold") + f" (turn {ev.turn}{resumed})  "
            + style(f"small {ev.small_model}", "small") + " · " + style(f"large {ev.large_model}", "large"))


def step_head(step: Step | StepStart, style: Style) -> str:
    """A step's marker: its index, who writes it and why ("[  3] LARGE H=1.23 >= 0.90  ")."""
    role = step.role.value if step.role else ""
    who = "LARGE" if role == "large" else "small"
    cmp = ">=" if step.decision is not None and step.decision.value == "large" else "< "
    value = f"H={fmt_float(step.entropy)}"
    if not math.isnan(step.threshold):
        value += f" {cmp} {fmt_float(step.threshold)}"
    return style(f"[{step.index:>3}] {who:<5} {value:<15}", role or "small") + " "


HEAD_WIDTH = 28  # len of an uncoloured step_head: the step's text is indented under it


def step_block(step: Step, style: Style) -> str:
    """One whole step: its marker, then its text, indented."""
    lines = step.text.strip("\n").splitlines() or [""]
    pad = " " * HEAD_WIDTH
    return step_head(step, style) + "\n".join([lines[0]] + [pad + ln for ln in lines[1:]])


class StepText:
    """A step's text as it streams in: indented under its marker, without the blank
    line that ends it (held back until more text shows it was not the end)."""

    def __init__(self) -> None:
        self.started = False
        self.held = ""

    def feed(self, text: str) -> str:
        if not self.started:
            text = text.lstrip("\n")
            if not text:
                return ""
            self.started = True
        body = text.rstrip("\n")
        out = (self.held + body) if body else ""
        self.held = (self.held if not body else "") + text[len(body):]
        return out.replace("\n", "\n" + " " * HEAD_WIDTH)


def summary_line(stats: Stats, wall_s: float, style: Style) -> str:
    parts = [
        f"{wall_s:.1f} s",
        f"{stats.steps} steps: {stats.small.steps} small, {stats.large.steps} large",
        f"intervention rate {stats.intervention_rate:.0%}",
        f"tokens: {stats.thinking_tokens} steps + {stats.answer_tokens} answer",
    ]
    ends = stats.thinking_end + (f", answer {stats.answer_end}" if stats.answer_end not in ("", "none") else "")
    if ends:
        parts.append(f"ended: {ends}")
    return style("── " + " · ".join(parts), "bold")


def session_table(info: SessionInfo, style: Style) -> str:
    s = info.stats
    mode = info.prefix_mode.value if info.prefix_mode else ""
    out = [
        style(f"session {info.session_id}", "bold") + f"  status {info.status} · turn {info.turn} · prefix {mode}",
        style(f"small {info.small_model}", "small") + " · " + style(f"large {info.large_model}", "large"),
    ]
    if info.error:
        out.append(style(f"error: {info.error}", "red"))
    head = f"{'#':>4} {'turn':>4}  {'model':<6} {'entropy':>8} {'tau':>6}  {'decision':<8} {'tokens':>6} {'latency ms':>11}  model id"
    out += ["", head, "-" * len(head)]
    for st in info.steps:
        role, decision = st.role.value if st.role else "", st.decision.value if st.decision else ""
        row = (f"{st.index:>4} {st.turn:>4}  {role:<6} {fmt_float(st.entropy, 3):>8} {fmt_float(st.threshold):>6}  "
               f"{decision:<8} {st.tokens:>6} {st.latency_ms:>11.1f}  {st.model_id}")
        out.append(style(row, role) if role else row)
    n = len(info.steps)
    large = sum(1 for st in info.steps if st.role is not None and st.role.value == "large")
    out += ["", f"{n} steps: {n - large} small, {large} large · intervention rate {large / n if n else 0:.0%}"
            f" · last turn: {s.thinking_tokens} step tokens + {s.answer_tokens} answer tokens"]
    out.append(trace_line(info.trace_ids))
    if info.answer:
        out += ["", style("answer", "bold"), info.answer]
    return "\n".join(out)


def trace_line(trace_ids: list[str]) -> str:
    """The session's OpenTelemetry trace ids, to paste into Jaeger's search by trace id."""
    if not trace_ids:
        return "trace: none recorded (tracing is off unless OTEL_EXPORTER_OTLP_ENDPOINT is set; see docs/observability.md)"
    line = f"trace {trace_ids[-1]}"
    if len(trace_ids) > 1:
        line += f"  (latest request; earlier: {' '.join(reversed(trace_ids[:-1]))})"
    return line


def stdout_style(mode: str = "auto") -> Style:
    return Style.for_stream(sys.stdout, mode)
