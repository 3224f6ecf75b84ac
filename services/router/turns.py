"""Turn building: the tokens a turn starts from.

The first turn of a session is its conversation rendered with the chat template;
a later turn is the new messages rendered onto the stored prefix (never
re-rendered, so the workers' KV caches stay valid). For thinking models the
reasoning starts right after "<think>": the router appends it when the template
does not. In token mode one prefix is rendered with the large model's template
(the conversation is the large model's; the small one assists in it); in text
mode each model gets its own rendering.
"""
from __future__ import annotations

from typing import Protocol

from services.router.api.types import Message, PrefixMode, Role
from services.router.config import RouterSettings
from services.router.errors import InvalidArgument
from services.router.session import Kind, Record, SessionOptions, TurnState, views_for
from services.router.worker_client import WorkerClient
from services.worker.types import ChatMessage, ModelInfo

# Rendered as the previous assistant reply so the text after it is exactly what the
# chat template puts between that reply and the new turn's generation prompt.
_SENTINEL = "GLIMPROUTER_TURN_SENTINEL_5f0c"


class Pool(Protocol):
    info: ModelInfo

    def bind(self, session_id: str, affinity: dict[str, str]) -> WorkerClient: ...

    def forget(self, session_id: str) -> None: ...


def prefix_mode(small: ModelInfo, large: ModelInfo) -> PrefixMode:
    # Token ids can only travel between models that mean the same thing by them.
    fs, fl = small.tokenizer_fingerprint, large.tokenizer_fingerprint
    return PrefixMode.TOKENS if fs and fs == fl else PrefixMode.TEXT


class Turns:
    def __init__(self, settings: RouterSettings, pools: dict[Role, Pool]) -> None:
        self.settings = settings
        self.pools = pools
        self.mode = prefix_mode(pools[Role.SMALL].info, pools[Role.LARGE].info)
        self.constants: dict[tuple[Role, str], list[int]] = {}  # tokens of constant texts ("<think>\n"), per model

    def think(self, options: SessionOptions) -> tuple[bool, str, str]:
        """Whether the turn runs with <think> framing, and its delimiters."""
        si, li = self.pools[Role.SMALL].info, self.pools[Role.LARGE].info
        think = options.think if options.think is not None else bool(si.think_end and li.think_end)
        return think, li.think_start or si.think_start or "<think>", li.think_end or si.think_end or "</think>"

    async def _constant(self, role: Role, client: WorkerClient, text: str) -> list[int]:
        key = (role, text)
        if key not in self.constants:
            self.constants[key] = await client.tokenize(text)
        return list(self.constants[key])

    def check_prompt(self, ids: list[int], what: str) -> None:
        if len(ids) > self.settings.max_prompt_tokens:
            raise InvalidArgument(
                f"the {what} has {len(ids)} tokens; the limit is {self.settings.max_prompt_tokens} (--max-prompt-tokens)"
            )
        # Refused here, before anything is stored, rather than by the worker's first step.
        context = min(p.info.context_length for p in self.pools.values())
        if len(ids) >= context:
            raise InvalidArgument(
                f"the {what} has {len(ids)} tokens; the models' context holds {context} and a step needs room to be written"
            )

    async def first(self, clients: dict[Role, WorkerClient], messages: list[Message], think: bool,
                    think_start: str) -> tuple[Record, dict[str, list[int]]]:
        """The session's first record: its conversation, rendered, per view."""
        views = views_for(self.mode)
        tokens: dict[str, list[int]] = {}
        text = ""
        for role in (Role.LARGE, Role.SMALL):
            if views[role] in tokens:
                continue
            client = clients[role]
            ids, text_r = await client.render_prompt([ChatMessage(m.role, m.content) for m in messages], True, False)
            if think and not text_r.rstrip().endswith(think_start):
                # The paper's framing: the reasoning starts right after "<think>".
                ids, text_r = ids + await self._constant(role, client, think_start + "\n"), text_r + think_start + "\n"
            self.check_prompt(ids, "rendered prompt")
            tokens[views[role]] = ids
            text = text or text_r
        return Record(Kind.PROMPT, 0, text=text, tokens=len(next(iter(tokens.values())))), tokens

    async def next(self, clients: dict[Role, WorkerClient], state: TurnState, messages: list[Message], think: bool,
                   think_start: str) -> tuple[Record, dict[str, list[int]]]:
        """A new turn's record: the new messages rendered onto each view's stored prefix."""
        views = views_for(state.mode)
        tokens: dict[str, list[int]] = {}
        text = ""
        for role in (Role.LARGE, Role.SMALL):
            view = views[role]
            if view in tokens:
                continue
            ids, text_r = await self._tail(clients[role], messages, state.prefixes[view], think, think_start)
            self.check_prompt(state.prefixes[view] + ids, "session prefix with the new turn")
            tokens[view] = ids
            text = text or text_r
        return Record(Kind.TURN, state.turn + 1, text=text, tokens=len(next(iter(tokens.values())))), tokens

    async def _tail(self, client: WorkerClient, messages: list[Message], prefix: list[int], think: bool,
                    think_start: str) -> tuple[list[int], str]:
        """The tokens that follow a finished turn's stored prefix to open a new one:
        the template's text after an assistant reply, through the new messages, to the
        generation prompt."""
        convo = [ChatMessage("user", "."), ChatMessage("assistant", _SENTINEL)] + [ChatMessage(m.role, m.content) for m in messages]
        _, text = await client.render_prompt(convo, True, False)
        if _SENTINEL in text:
            tail = text[text.index(_SENTINEL) + len(_SENTINEL):]
        else:  # a template that drops assistant text: fall back to plain joining
            tail = "\n\n" + "\n\n".join(m.content for m in messages) + "\n\n"
        if think and not tail.rstrip().endswith(think_start):
            tail += think_start + "\n"
        ids = await client.tokenize(tail)
        # The reply already ended with the end-of-turn token the template writes next.
        if ids and prefix and ids[0] == prefix[-1] and prefix[-1] in client.info.eos_token_ids:
            ids = ids[1:]
        return ids, tail
