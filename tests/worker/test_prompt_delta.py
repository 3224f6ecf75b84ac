"""Prompt deltas (services/worker/prompt_delta.py): the router's end encodes a session's
prompt against what it sent before on the stream, the worker's end makes it whole again.
Driven here without a stream: the two ends see the calls in the same order, as a
Multiplex stream delivers them."""
from __future__ import annotations

import random

from glimprouter.v1 import worker_pb2 as pb
from services.worker.prompt_delta import Continued, Receiver, Sender


def carry(sender: Sender, receiver: Receiver, session_id: str, prompt) -> tuple[pb.Prompt, bool, str]:
    """One call's prompt over the stream: as sent, whether a delta, the worker's refusal."""
    wire = pb.Prompt()
    delta = sender.encode(session_id, prompt, wire)
    sent = pb.Prompt()
    sent.CopyFrom(wire)
    return sent, delta, receiver.resolve(session_id, wire) or ("" if list(wire.token_ids.ids) == list(prompt) else "wrong")


def test_a_growing_session_sends_only_what_it_added():
    sender, receiver = Sender(), Receiver()
    prefix = list(range(1000, 3000))  # a long session
    first, delta, err = carry(sender, receiver, "s", prefix)
    assert (delta, err) == (False, "") and len(first.token_ids.ids) == 2000
    prefix.extend([7, 8, 9])  # a step was stored
    sent, delta, err = carry(sender, receiver, "s", prefix)
    assert (delta, err) == (True, "")
    assert sent.delta.keep == 2000 and list(sent.delta.ids) == [7, 8, 9]
    # The same prefix followed by tokens that are not stored (a catch-up chunk, the answer's join)
    sent, delta, err = carry(sender, receiver, "s", Continued(prefix, [4, 5]))
    assert (delta, err) == (True, "") and (sent.delta.keep, list(sent.delta.ids)) == (2003, [4, 5])
    # ... and back to the prefix alone: the chunk is dropped, nothing is re-sent
    sent, delta, err = carry(sender, receiver, "s", prefix)
    assert (delta, err) == (True, "") and (sent.delta.keep, list(sent.delta.ids)) == (2003, [])


def test_another_list_or_a_shorter_one_goes_whole():
    sender, receiver = Sender(), Receiver()
    prefix = [1, 2, 3, 4]
    carry(sender, receiver, "s", prefix)
    _, delta, err = carry(sender, receiver, "s", list(prefix) + [5])  # equal tokens, but not the session's list
    assert (delta, err) == (False, "")
    other = [1, 2]
    carry(sender, receiver, "s", other)
    del other[1:]  # (a list that shrank is not a session prefix; the sender must not send a delta for it)
    _, delta, err = carry(sender, receiver, "s", other)
    assert (delta, err) == (False, "")
    _, delta, err = carry(sender, receiver, "", prefix)  # no session: nothing to be a delta against
    assert (delta, err) == (False, "")


def test_both_ends_drop_the_same_sessions_so_a_delta_always_resolves():
    rng = random.Random(7)
    sender, receiver = Sender(sessions=8), Receiver(sessions=8)
    prefixes: dict[str, list[int]] = {}
    deltas = 0
    for _ in range(3000):
        sid = f"s{rng.randrange(20)}"  # more sessions than either end keeps
        p = prefixes.setdefault(sid, [rng.randrange(50_000) for _ in range(rng.randrange(1, 30))])
        p.extend(rng.randrange(50_000) for _ in range(rng.randrange(0, 5)))
        prompt = Continued(p, [rng.randrange(50_000) for _ in range(rng.randrange(0, 4))]) if rng.random() < 0.3 else p
        _, delta, err = carry(sender, receiver, sid, prompt)
        assert err == ""
        deltas += delta
    assert 500 < deltas < 3000  # both kinds happened


def test_the_worker_refuses_a_delta_it_cannot_resolve_and_then_takes_the_prompt_whole():
    sender, receiver = Sender(sessions=8), Receiver(sessions=2)  # a worker that keeps fewer than the router thinks
    prefixes = {sid: [1, 2, 3] for sid in "abc"}
    for sid in "abc":
        carry(sender, receiver, sid, prefixes[sid])
    prefixes["a"].append(4)
    wire = pb.Prompt()
    assert sender.encode("a", prefixes["a"], wire)
    why = receiver.resolve("a", wire)
    assert "prompt.delta" in why and "'a'" in why and "whole" in why
    sender.forget("a")  # what the router's stream does on FAILED_PRECONDITION
    _, delta, err = carry(sender, receiver, "a", prefixes["a"])
    assert (delta, err) == (False, "")
    prefixes["a"].append(5)
    _, delta, err = carry(sender, receiver, "a", prefixes["a"])
    assert (delta, err) == (True, "")


def test_continued_reads_as_its_tokens_and_keeps_the_prefix_as_it_was():
    prefix = [1, 2, 3]
    c = Continued(prefix, [8, 9])
    prefix.append(4)  # the session goes on: what was sent does not change
    assert list(c) == [1, 2, 3, 8, 9] and len(c) == 5
    assert (c[0], c[3], c[-1], c[1:4]) == (1, 8, 9, [2, 3, 8])
    assert c.base is prefix and c.base_len == 3  # not a copy: the sender knows the list
