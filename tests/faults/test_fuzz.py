"""Property-based fuzzing (hypothesis) of the request validators at each service
and of the step/prefix code.

Validators: whatever a client sends, a validator returns parameters that are
safe to act on or raises its own clear error, never anything else (a
TypeError, UnicodeEncodeError or OverflowError here would be a 500 there).
Step cutting: the text is exactly the UTF-8 decoding of the tokens fed, and a
step ends at the first boundary after some content, never earlier. Prefix
packing: what Redis APPENDs piece by piece unpacks to the whole, and a store's
guarded appends leave the prefix equal to the concatenation of the accepted steps.
"""
from __future__ import annotations

import asyncio
import math
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.chat import ChatRequest, parse_chat_request
from gateway.errors import APIError
from glimprouter.v1 import router_pb2 as rpb
from glimprouter.v1 import worker_pb2 as wpb
from services.router import admission
from services.router.api import GlimpseMode, protomap
from services.router.errors import LeaseLost, RouterError
from services.router.session import Kind, Record, SessionMeta, SessionOptions
from services.router.store import SessionStore, pack_ids, unpack_ids
from services.worker import validation as v
from services.worker.stepcut import StepCutter
from services.worker.types import FinishReason

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INT32 = st.integers(-(2**31), 2**31 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
DOUBLES = st.floats(allow_nan=True, allow_infinity=True)
# Text as protobuf can carry it (valid UTF-8), weighted towards the characters that matter.
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["", " ", "\n\n", "user", "assistant", "system", "tool", "robot", "glimpse", "random", "p", "\x00"]
)


# ---- the worker's validators -------------------------------------------------------------------
LIMITS = v.Limits(vocab_size=512, context_length=64)


@st.composite
def prompts(draw):
    kind = draw(st.sampled_from(["ids", "text", "none"]))
    if kind == "ids":
        return wpb.Prompt(token_ids=wpb.TokenIds(ids=draw(st.lists(INT32 | st.integers(0, 600), max_size=80))))
    if kind == "text":
        return wpb.Prompt(text=draw(TEXT))
    return wpb.Prompt()


@st.composite
def samplings(draw):
    s = wpb.Sampling()
    if draw(st.booleans()):
        s.temperature = draw(FLOATS)
    if draw(st.booleans()):
        s.top_p = draw(FLOATS)
    if draw(st.booleans()):
        s.top_k = draw(INT32)
    if draw(st.booleans()):
        s.max_tokens = draw(INT32)
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2**64 - 1))
    return s


@FUZZ
@given(prompt=prompts(), sampling=samplings(), top_k=INT32, threshold=DOUBLES, method=INT32, sid=TEXT)
def test_worker_validators_return_safe_values_or_invalid_argument(prompt, sampling, top_k, threshold, method, sid):
    def tokenize(text: str) -> list[int]:
        return [1] + [min(ord(c), 511) for c in text]

    for check in (
        lambda: v.prompt_ids(prompt, LIMITS, tokenize),
        lambda: v.sampling(sampling),
        lambda: v.top_k(top_k),
        lambda: v.threshold(threshold),
        lambda: v.entropy_method(method),
        lambda: v.session_id(sid * 10),
    ):
        try:
            out = check()
        except v.InvalidArgument as exc:
            assert exc.field and str(exc).startswith(exc.field)
            continue
        if isinstance(out, list):  # prompt ids
            assert out and len(out) < LIMITS.context_length and all(0 <= t < LIMITS.vocab_size for t in out)
    try:
        s = v.sampling(sampling)
    except v.InvalidArgument:
        return
    assert math.isfinite(s.temperature) and s.temperature >= 0 and 0 < s.top_p <= 1 and s.max_tokens >= 1 and s.top_k >= 0


@FUZZ
@given(boundary=st.none() | TEXT, stops=st.lists(TEXT, max_size=20), eos=st.booleans(),
       messages=st.lists(st.tuples(TEXT, TEXT), max_size=5), add=st.booleans(), cont=st.booleans())
def test_worker_stop_and_message_validators(boundary, stops, eos, messages, add, cont):
    stop = wpb.StopCondition(stop=stops, stop_on_eos=eos)
    if boundary is not None:
        stop.step_boundary = boundary
    try:
        p = v.stop(stop)
        assert len(p.stop) <= v.MAX_STOP_STRINGS and all(0 < len(x) <= v.MAX_STOP_LENGTH for x in p.stop)
    except v.InvalidArgument:
        pass
    try:
        out = v.messages([wpb.ChatMessage(role=r, content=c) for r, c in messages], add, cont)
        assert out and all(m.role in v.ROLES for m in out)
        assert not (add and cont)
    except v.InvalidArgument:
        pass


# ---- the router's validation (protobuf -> options -> checks) -----------------------------------------------
ENUM = st.integers(-5, 12) | INT32


@st.composite
def reason_requests(draw):
    r = rpb.ReasonRequest(session_id=draw(TEXT), prompt=draw(TEXT), answer_by=draw(ENUM))
    for role, content in draw(st.lists(st.tuples(TEXT, TEXT), max_size=3)):
        r.messages.add(role=role, content=content)
    if draw(st.booleans()):
        r.routing.policy = draw(st.sampled_from(["", "glimpse", "random", "verify", "adaptive", "large-only"]) | TEXT)
        r.routing.glimpse_mode = draw(ENUM)
        r.routing.entropy = draw(ENUM)
        if draw(st.booleans()):
            r.routing.threshold = draw(DOUBLES)
        if draw(st.booleans()):
            r.routing.top_k = draw(INT32)
        for k, val in draw(st.dictionaries(st.sampled_from(["p", "target", "eta", "window", "accept_score", "top_k"]) | TEXT,
                                           DOUBLES, max_size=3)).items():
            r.routing.params[k] = val
    if draw(st.booleans()):
        for name in ("step_tokens", "thinking_tokens", "answer_tokens", "max_steps"):
            if draw(st.booleans()):
                setattr(r.budgets, name, draw(INT32))
    if draw(st.booleans()):
        if draw(st.booleans()):
            r.sampling.temperature = draw(FLOATS)
        if draw(st.booleans()):
            r.sampling.top_p = draw(FLOATS)
        if draw(st.booleans()):
            r.sampling.seed = draw(st.integers(0, 2**64 - 1))
    return r


@FUZZ
@given(request=reason_requests())
def test_router_validation_accepts_only_safe_options(request):
    # The servicer's whole path: parse the bytes, map to the request, resolve the options, validate.
    parsed = rpb.ReasonRequest.FromString(request.SerializeToString())
    try:
        req = protomap.request_from_pb(parsed)
    except ValueError as exc:  # an enum value the router does not know: INVALID_ARGUMENT
        assert str(exc)
        return
    try:
        o, _ = admission.resolve(req)
        admission.validate(req, o)
    except RouterError as exc:
        assert exc.code == "INVALID_ARGUMENT" and str(exc)
        return
    assert math.isfinite(o.routing.threshold) and 1 <= o.routing.top_k <= 100
    assert all(math.isfinite(x) for x in o.routing.params.values())
    assert isinstance(o.routing.glimpse_mode, GlimpseMode) and o.routing.entropy is not None
    assert min(o.budgets.step_tokens, o.budgets.thinking_tokens, o.budgets.answer_tokens) > 0 and o.budgets.max_steps >= 0
    assert math.isfinite(o.sampling.temperature) and 0 < o.sampling.top_p <= 1
    # What is stored with the session reads back the same.
    assert SessionOptions.from_json(o.to_json()) == o


# ---- the gateway's chat.py --------------------------------------------------------------------------------------
JSON_SCALARS = st.none() | st.booleans() | st.integers() | DOUBLES | st.text(max_size=12)  # lone surrogates included
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
FIELDS = ["messages", "model", "temperature", "top_p", "seed", "max_tokens", "max_completion_tokens", "stream",
          "stream_options", "n", "tools", "logprobs", "stop", "response_format", "policy", "threshold", "params",
          "glimpse_mode", "entropy", "entropy_top_k", "budgets", "answer_by", "think"]


@st.composite
def chat_bodies(draw):
    body = draw(st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6))
    if draw(st.booleans()):
        roles = st.sampled_from(["user", "system", "assistant", "developer", "robot"]) | JSON
        content = st.text(max_size=20) | JSON | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)}))
        body["messages"] = draw(st.lists(st.fixed_dictionaries({"role": roles, "content": content}), max_size=3))
    if draw(st.booleans()):
        body["budgets"] = draw(st.dictionaries(st.sampled_from(["step_tokens", "thinking_tokens", "answer_tokens", "max_steps", "x"]),
                                               st.integers() | DOUBLES | st.booleans(), max_size=3))
    return body


@FUZZ
@given(body=chat_bodies() | JSON, session=st.sampled_from(["", "0123abcd"]))
def test_gateway_parses_to_a_sendable_request_or_a_clear_error(body, session):
    try:
        req = parse_chat_request(body, model_name="glimprouter", session_id=session)
    except APIError as exc:
        assert exc.status in (400, 404) and exc.message
        return
    assert isinstance(req, ChatRequest) and (req.reason.messages or session)
    # Everything accepted must reach the router: serialising never fails, and the router reads it back the same.
    wire = protomap.request_to_pb(req.reason).SerializeToString()
    back = protomap.request_from_pb(rpb.ReasonRequest.FromString(wire))
    assert back.messages == req.reason.messages
    s, r = req.reason.sampling, req.reason.routing
    for x in ((s.temperature, s.top_p) if s else ()) + ((r.threshold,) if r else ()):
        assert x is None or math.isfinite(x)


# ---- step cutting -----------------------------------------------------------------------------------------
PIECES = [b"\n", b"\n\n", b" ", b"a", b"ok.", b".\n\n", b"\xc3", b"\xa9", b"\xe2\x82", b"\xac", b"\xff", b"\n\nx", b"END"]


@FUZZ
@given(tokens=st.lists(st.integers(0, len(PIECES) - 1), max_size=40), boundary=st.sampled_from(["\n\n", "END", ""]),
       stops=st.lists(st.sampled_from(["ok", "é", "€", "zz"]), max_size=2))
def test_step_cutter_cuts_at_the_first_boundary_after_content(tokens, boundary, stops):
    cut = StepCutter(lambda t: PIECES[t], boundary, stops)
    fed: list[bytes] = []
    deltas = []
    for t in tokens:
        fed.append(PIECES[t])
        deltas.append(cut.feed(t))
        if cut.done is not None:
            break
    deltas.append(cut.flush())
    text = b"".join(fed).decode("utf-8", errors="replace")
    assert cut.text == text == "".join(deltas)  # exactly the tokens' text, streamed without loss
    content = len(text) - len(text.lstrip())

    def ends(s: str) -> bool:  # a boundary after some content, or a stop string
        return bool(boundary and content < len(s) and boundary in s[content:]) or any(x in s for x in stops)

    if cut.done is None:
        assert not ends(text)
    else:
        assert cut.done in (FinishReason.STEP_END, FinishReason.STOP)
        before = b"".join(fed[:-1]).decode("utf-8", errors="replace")
        assert not ends(before[: len(before) - 3])  # not already over before the last token (UTF-8 tails aside)
        if cut.done is FinishReason.STEP_END:
            assert text.strip() and boundary in text[content:]


# ---- prefix packing ------------------------------------------------------------------------------------------
@FUZZ
@given(chunks=st.lists(st.lists(INT32, max_size=30), max_size=8))
def test_packed_chunks_append_to_the_whole(chunks):
    whole = [t for c in chunks for t in c]
    assert unpack_ids(b"".join(pack_ids(c) for c in chunks)) == whole  # what Redis APPEND builds
    assert unpack_ids(pack_ids(whole)) == whole and len(pack_ids(whole)) == 4 * len(whole)


@pytest.fixture(scope="module")
def redis_url(faults):
    r = faults.RedisProc()
    yield r.url
    r.close()


OPS = st.lists(st.tuples(st.lists(st.integers(0, 2**31 - 1), max_size=12), st.sampled_from(["ok", "stale", "stranger"])),
               max_size=10)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_guarded_appends_keep_the_prefix_equal_to_the_accepted_steps(redis_url, ops):
    async def run() -> None:
        store = SessionStore.from_url(redis_url, f"fuzz-{uuid.uuid4().hex[:6]}:", 60, 5000, 0)
        sid, token = "s", store.new_lease_token("me")
        prompt = [1, 2, 3]
        try:
            await store.create(sid, token, Record(Kind.PROMPT, 0, text="p", tokens=3), {"shared": prompt}, SessionMeta())
            expected, log_len = list(prompt), 1
            for i, (ids, who) in enumerate(ops):
                rec = Record(Kind.STEP, 0, index=i, text="x", tokens=len(ids))
                tok = token if who != "stranger" else store.new_lease_token("other")
                pos = log_len if who == "ok" else log_len - 1  # a retried write expects the old length
                try:
                    await store.append(sid, tok, pos, [(rec, {"shared": ids})], {})
                except LeaseLost:
                    assert who != "ok"
                    continue
                assert who == "ok"
                expected += ids
                log_len += 1
            s = await store.load(sid)
            assert s.prefixes["shared"] == expected and len(s.records) == log_len
            assert sum(r.tokens for r in s.records) == len(expected)
        finally:
            await store.close()

    asyncio.run(run())
