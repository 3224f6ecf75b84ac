"""Token streaming through the whole path, as an OpenAI client sees it: the official
client -> the gateway -> the real router -> sim workers that decode token by token
(a few ms a token), sessions in a private Redis.

A streamed multi-step reply arrives in more chunks than it has steps (the steps'
text streams as it is written), and the text joined from the chunks is the
non-streaming reply for the same seed."""
from __future__ import annotations

import httpx
import openai
import pytest

BODY = {"budgets": {"max_steps": 5}, "seed": 21, "answer_by": "large"}
MSG = [{"role": "user", "content": "Count to five, one number a step."}]


@pytest.fixture(scope="module")
def sim_gateway(faults):
    s = faults.Stack()
    try:
        r = s.redis()
        small = s.sim("sim-small", steps=6, step_tokens=10, token_latency_s=0.003)
        large = s.sim("sim-large", steps=6, step_tokens=10, token_latency_s=0.003)
        router = s.router([small.address], [large.address], r.url, "--stream-interval-ms", "0", "--metrics-port", "0")
        gw = s.gateway(router.address)
        yield f"http://{gw.address}", router
    finally:
        s.close()


def test_a_streamed_reply_comes_in_more_chunks_than_steps_and_joins_to_the_whole_reply(sim_gateway, faults):
    url, router = sim_gateway
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    full = client.chat.completions.create(model="glimprouter", messages=MSG, extra_body=BODY)
    msg, steps = full.choices[0].message, full.glimprouter["steps"]["total"]
    assert steps >= 3 and msg.reasoning_content and msg.content

    reasoning, content, text_chunks, starts = "", "", 0, []
    for chunk in client.chat.completions.create(model="glimprouter", messages=MSG, extra_body=BODY, stream=True):
        g = chunk.model_extra.get("glimprouter") or {}
        if "step" in g:
            starts.append(g["step"])
        for ch in chunk.choices:
            r, c = getattr(ch.delta, "reasoning_content", None) or "", ch.delta.content or ""
            reasoning, content = reasoning + r, content + c
            text_chunks += bool(r or c)
    assert text_chunks > steps  # the steps' text streamed, not one chunk per step
    assert reasoning == msg.reasoning_content and content == msg.content  # same seed, same reply
    # Each step was announced (writer and entropy) with its first chunk.
    assert [(s["index"], s["model"]) for s in starts] == [(s["index"], s["model"]) for s in full.glimprouter["step_log"]]

    # Time to first token and inter-token latency, at the gateway and the router.
    text = httpx.get(url + "/metrics", timeout=10).text
    assert 'glimprouter_gateway_time_to_first_token_seconds_count{stream="true"} 1.0' in text
    assert 'glimprouter_gateway_time_to_first_token_seconds_count{stream="false"} 1.0' in text
    assert 'glimprouter_gateway_inter_token_latency_seconds_count{stream="true"}' in text
    assert faults.metric(router, "glimprouter_router_time_to_first_token_seconds_count") == 2
    assert faults.metric(router, "glimprouter_router_inter_token_latency_seconds_count") > 2 * steps
