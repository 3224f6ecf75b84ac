"""A session (the router's GetSession) as JSON: what the gateway's GET /v1/sessions/{id}
and `glimprouter session show --format json` both return."""
from __future__ import annotations

import json

from services.router.api.types import SessionInfo


def session_json(info: SessionInfo) -> dict:
    try:
        options = json.loads(info.options_json) if info.options_json else None
    except ValueError:
        options = info.options_json
    steps = [{**st.routing(), "text": st.text} for st in info.steps]
    s = info.stats
    return {
        "id": info.session_id,
        "object": "glimprouter.session",
        "status": info.status,
        "turn": info.turn,
        "prefix_mode": info.prefix_mode.value if info.prefix_mode else "",
        "small_model": info.small_model,
        "large_model": info.large_model,
        "options": options,
        "answer": info.answer,
        "error": info.error or None,
        "stats": {"steps": s.steps, "small_steps": s.small.steps, "large_steps": s.large.steps,
                  "intervention_rate": s.intervention_rate, "latency_ms": s.latency_ms,
                  "thinking_tokens": s.thinking_tokens, "answer_tokens": s.answer_tokens,
                  "thinking_end": s.thinking_end, "answer_end": s.answer_end},
        "steps": steps,
        "created_unix_ms": info.created_unix_ms,
        "updated_unix_ms": info.updated_unix_ms,
        "trace_ids": list(info.trace_ids),
    }
