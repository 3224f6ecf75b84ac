"""Chat messages -> prompt tokens for backends that expose their chat template
as text (llama.cpp, sim)."""
from __future__ import annotations

from typing import Sequence

from services.worker.batch import BatchModel
from services.worker.types import ChatMessage

_SENTINEL = "\x00GLIMPROUTER_CONTINUE\x00"


def render_prompt(
    model: BatchModel, messages: Sequence[ChatMessage], add_generation_prompt: bool, continue_final_message: bool
) -> tuple[list[int], str]:
    msgs = list(messages)
    if continue_final_message:
        # Render with a sentinel in place of the final message's end, then cut
        # there: the template's end-of-turn tokens must not follow the text.
        last = msgs[-1]
        msgs[-1] = ChatMessage(last.role, last.content + _SENTINEL)
        text = model.chat_template_text(msgs, False)
        if text is None:
            text = "".join(m.content for m in msgs)
        text = text[: text.index(_SENTINEL)]
    else:
        text = model.chat_template_text(msgs, add_generation_prompt)
        if text is None:
            text = "\n\n".join(m.content for m in msgs)
    return model.tokenize(text, True), text
