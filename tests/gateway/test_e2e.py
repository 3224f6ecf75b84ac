"""End to end on the default path: the official OpenAI client -> gateway -> the real
router -> two real llama.cpp workers (SmolLM2), sessions in a private Redis."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

# Short turns: the plumbing is under test, not SmolLM2's arithmetic.
BUDGETS = {"max_steps": 3, "step_tokens": 24, "answer_tokens": 24}
MSG = [{"role": "user", "content": "Tom has 3 apples and buys 2 more. How many apples does he have?"}]


@pytest.fixture(scope="module")
def client(real_stack):
    return openai.OpenAI(base_url=real_stack["gateway"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def assemble(stream):
    out = {"content": "", "reasoning": "", "finish": None, "usage": None, "info": None, "steps": [], "id": set()}
    for chunk in stream:
        out["id"].add(chunk.id)
        extra = chunk.model_extra.get("glimprouter") or {}
        if "step" in extra:
            out["steps"].append(extra["step"])
        if chunk.usage:
            out["usage"] = chunk.usage
        for ch in chunk.choices:
            out["content"] += ch.delta.content or ""
            out["reasoning"] += getattr(ch.delta, "reasoning_content", None) or ""
            if ch.finish_reason:
                out["finish"], out["info"] = ch.finish_reason, extra
    return out


def test_ready_and_models(real_stack, client):
    r = httpx.get(real_stack["gateway"] + "/readyz")
    assert r.status_code == 200, r.text
    assert [m.id for m in client.models.list()] == ["glimprouter"]


def test_completion_streaming_and_not_have_the_same_shape(client):
    body = {"budgets": BUDGETS, "seed": 11}
    full = client.chat.completions.create(model="glimprouter", messages=MSG, temperature=0, extra_body=body)
    msg, g = full.choices[0].message, full.glimprouter
    assert msg.role == "assistant" and msg.content
    assert g["steps"]["total"] == len(g["step_log"]) >= 1
    assert g["steps"]["small"] + g["steps"]["large"] == g["steps"]["total"]
    assert g["intervention_rate"] == pytest.approx(g["steps"]["large"] / g["steps"]["total"])
    assert all(s["model"] in ("small", "large") and s["tokens"] > 0 for s in g["step_log"])
    assert full.usage.completion_tokens >= full.usage.completion_tokens_details.reasoning_tokens > 0
    assert full.choices[0].finish_reason in ("stop", "length")

    got = assemble(client.chat.completions.create(model="glimprouter", messages=MSG, temperature=0, stream=True,
                                                  stream_options={"include_usage": True}, extra_body=body))
    assert len(got["id"]) == 1
    assert got["content"]  # the answer streamed
    assert set(got["info"]) == set(g) and set(got["info"]["roles"]) == {"small", "large"}
    assert [(s["index"], s["model"]) for s in got["steps"]] == [(s["index"], s["model"]) for s in got["info"]["step_log"]]
    assert got["info"]["steps"]["total"] == len(got["steps"])
    assert got["finish"] in ("stop", "length")
    assert set(got["usage"].model_dump()) == set(full.usage.model_dump())
    # The same pieces in both: reasoning is the steps, content the answer.
    assert bool(got["reasoning"]) == bool(msg.reasoning_content)
    assert got["usage"].completion_tokens_details.reasoning_tokens == sum(s["tokens"] for s in got["info"]["step_log"])


def test_session_continues_on_its_prefix(real_stack, client):
    first = client.chat.completions.create(model="glimprouter", messages=MSG, extra_body={"budgets": BUDGETS})
    sid = first.glimprouter["session_id"]
    conv = [*MSG, {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "And if he eats one?"}]
    second = client.chat.completions.with_raw_response.create(
        model="glimprouter", messages=conv, extra_body={"budgets": BUDGETS}, extra_headers={"X-GlimpRouter-Session": sid})
    assert second.headers["x-glimprouter-session"] == sid
    g = second.parse().glimprouter
    assert g["session_id"] == sid and g["turn"] == 1
    s = httpx.get(real_stack["gateway"] + f"/v1/sessions/{sid}").json()
    assert s["turn"] == 1 and {x["turn"] for x in s["steps"]} == {0, 1}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="glimprouter", messages=MSG,
                                       extra_headers={"X-GlimpRouter-Session": "no-such-session"})


BAD_INPUT = [
    ("malformed JSON", b'{"model": "glimprouter", "messages": [{"role": "user", "content": "hi"}'),
    ("missing messages", {"model": "glimprouter"}),
    ("wrong types", {"model": "glimprouter", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}),
    ("unknown policy", {"model": "glimprouter", "messages": [{"role": "user", "content": "hi"}], "policy": "coin-flip"}),
    ("unknown policy param", {"model": "glimprouter", "messages": [{"role": "user", "content": "hi"}], "params": {"zz": 1}}),
    ("oversized body", {"model": "glimprouter", "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}),
]


@pytest.mark.parametrize("name,body", BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_input_through_the_real_router(real_stack, client, name, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(real_stack["gateway"] + "/v1/chat/completions", content=data, timeout=60,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if name.startswith("unknown policy"):
        assert "coin-flip" in err["message"] or "zz" in err["message"]
    # And it keeps serving.
    ok = client.chat.completions.create(model="glimprouter", messages=MSG, extra_body={"budgets": {"max_steps": 1, "step_tokens": 8}})
    assert ok.glimprouter["steps"]["total"] == 1
