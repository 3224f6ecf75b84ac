"""The ReasonStream outbox's rules for what goes in one message (server.py `_Outbox`):
the first text and Done at once, Started with the first text (or alone one interval
after it), later text once an interval has passed, a step's deltas merged.

No wall-clock figures are asserted: the outcomes follow from the order of the
event loop's timers (a producer sleeping longer than the interval always wakes
after the outbox's timer), whatever the machine's load."""
from __future__ import annotations

import asyncio

from services.router.api.types import Done, Started, StepDelta, StepStart
from services.router.server import _Outbox


class _Context:
    """What the outbox writes to: the messages, as the kinds of their events."""

    def __init__(self) -> None:
        self.messages: list[list[str]] = []
        self.texts: list[list[str]] = []

    async def write(self, msg) -> None:
        self.messages.append([ev.WhichOneof("event") for ev in msg.events])
        self.texts.append([ev.step_delta.text for ev in msg.events if ev.WhichOneof("event") == "step_delta"])


async def _serve(interval_s: float, produce) -> _Context:
    box, ctx = _Outbox(interval_s, budget_per_s=0), _Context()
    await box.send(ctx, asyncio.create_task(produce(box)))
    return ctx


async def test_started_rides_with_the_call_s_first_text():
    async def produce(box: _Outbox) -> None:
        await box.put(Started("s"))
        await asyncio.sleep(0.05)  # the first step's glimpse, well within the interval
        await box.put(StepStart(0))
        await box.put(StepDelta(0, "First", 1))
        await asyncio.sleep(0.05)
        await box.put(Done("s", "42"))

    ctx = await _serve(10.0, produce)
    # Started waited for the text rather than go alone; Done did not wait for the interval.
    assert ctx.messages == [["started", "step_start", "step_delta"], ["done"]]


async def test_started_goes_alone_one_interval_after_it_came_when_no_text_does():
    async def produce(box: _Outbox) -> None:
        await box.put(Started("s"))
        await asyncio.sleep(0.5)  # a slow first step: ten times the interval
        await box.put(StepDelta(0, "Late", 1))
        await box.put(Done("s"))

    ctx = await _serve(0.05, produce)
    assert ctx.messages[0] == ["started"]
    assert ctx.messages[1:] == [["step_delta", "done"]]


async def test_later_text_waits_for_the_interval_and_a_step_s_deltas_are_merged():
    async def produce(box: _Outbox) -> None:
        await box.put(Started("s"))
        await box.put(StepDelta(0, "a", 1))
        await asyncio.sleep(0.05)  # the first text went at once
        for piece in ("b", "c", "d"):
            await box.put(StepDelta(0, piece, 1))
            await asyncio.sleep(0.01)
        await box.put(Done("s"))

    ctx = await _serve(10.0, produce)
    assert ctx.messages == [["started", "step_delta"], ["step_delta", "done"]]
    assert ctx.texts == [["a"], ["bcd"]]
