"""A simulated batch model for load-testing the router: no model compute at all.

It writes a scripted chain of thought whose step starts are easy or hard on
purpose, so the router's decisions, handoffs and throughput can be measured
without a model. Latency is simulated with sleeps: one decode step per batch, whatever
the number of sequences in it (as on a GPU), plus a cost per prefilled token.

Vocabulary (512 tokens, the same in every SimModel, so a small and a large sim
share a tokenizer fingerprint and can hand token ids to each other): 6 special
tokens, 256 single-byte tokens (any text tokenizes), the step boundary "\\n\\n",
and word pieces. Tokenizing is greedy longest match; special tokens are parsed.

The next token is a pure function of the context tokens, so any two sims given
the same token list agree on where they are in the script:
  - the turn starts after the last <|im_start|> or <think> token (else at 0);
  - the step index is the number of "\\n\\n" tokens since the turn start, the
    position the number of tokens since the last "\\n\\n" (or the turn start);
  - while step index < `steps`: word pieces, then "\\n\\n" once the position
    reaches `step_tokens` - 1; then "</think>"; then `answer_tokens` word
    pieces; then <|sim_eos|>.
Word pieces come from a hash of (seed, step, position). The scripted token gets
almost all the mass (entropy ~0.05 nats, full and top-20 alike), except at
position 0 of a hard step, which is near-uniform over 64 tokens (full entropy
~ln 64 = 4.16, top-20 ~ln 20 = 3.0). A step is hard when its index is in
`hard_steps` or, independently, with probability `hard_fraction` drawn from
(seed, step); both default to none.
A sampled token off the script is fine: the script depends on positions, not on
earlier choices.
"""
from __future__ import annotations

import re
import time
from typing import Iterable, Sequence

import numpy as np

from services.worker.batch import Batch, BatchModel
from services.worker.types import ChatMessage

EOS, BOS, IM_START, IM_END, THINK, THINK_END = range(6)
_SPECIALS = ["<|sim_eos|>", "<|sim_bos|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
_BYTE0 = len(_SPECIALS)
BOUNDARY = _BYTE0 + 256
VOCAB_SIZE = 512
_WORDS = (
    "the a an of to and is are so we it this that then now first next step steps total sum each "
    "number numbers add adding multiply divide subtract half twice more less left per which gives "
    "equals answer result means there has have with from for in on at by cost costs price apples "
    "eggs days hours minutes miles dollars people students books bags boxes times remaining "
    "together altogether check wait let us find compute need know since because therefore"
).split()
_M64 = (1 << 64) - 1
_PEAK = 7.8  # scripted logit over ~15 alternatives at 0: entropy ~0.05 nats
_HARD_BUMP = 0.05  # keeps greedy decoding on the script in a near-uniform step start
_FLOOR = -40.0  # the rest of the vocabulary: no visible mass
_ANSWER_STEP = 1 << 20  # hash slot for answer tokens, away from any step index


def _pieces() -> list[bytes]:
    pieces = [s.encode() for s in _SPECIALS] + [bytes([b]) for b in range(256)] + [b"\n\n"]
    pieces += [w.encode() for w in ("user", "assistant", "system")]
    pieces += [f" {w}".encode() for w in _WORDS]
    n = 0
    while len(pieces) < VOCAB_SIZE:
        pieces.append(f" {n}".encode())
        n += 1
    assert len(set(pieces)) == VOCAB_SIZE, "every piece must be distinct"
    return pieces


_PIECES = _pieces()
_CONTENT = np.arange(BOUNDARY + 4, VOCAB_SIZE)  # word pieces with a leading space (not the role names)
_WIDE, _NARROW = np.arange(64), np.arange(15)  # offsets of the alternatives to the scripted token
_BASE = np.full(VOCAB_SIZE, _FLOOR, dtype=np.float32)


def _mix(*xs: int) -> int:
    """A small deterministic integer hash (Python's hash() of str is salted per process)."""
    h = 0x243F6A8885A308D3
    for x in xs:
        h = ((h ^ (x & _M64)) * 0x9E3779B97F4A7C15) & _M64
        h ^= h >> 29
    return h


class _Context:
    """A context's tokens and where they stand in the script (kept per session)."""

    __slots__ = ("tokens", "turn", "anchor", "step", "end")

    def __init__(self, tokens: list[int], turn: int = 0, anchor: int = 0, step: int = 0, end: int = -1) -> None:
        self.tokens, self.turn, self.anchor, self.step, self.end = tokens, turn, anchor, step, end

    @classmethod
    def scan(cls, t: list[int]) -> _Context:
        rev = t[::-1]
        turn = 0
        for marker in (IM_START, THINK):
            try:
                turn = max(turn, len(t) - rev.index(marker))
            except ValueError:
                pass
        tail = t[turn:]
        step = tail.count(BOUNDARY)
        end = len(t) - rev.index(THINK_END) if THINK_END in tail else -1
        anchor = len(t) - rev.index(BOUNDARY) if step else turn
        return cls(t, turn, anchor, step, end)

    def advance(self, token: int, n: int) -> None:
        """Account for `token`, which made the context `n` tokens long."""
        if token == IM_START or token == THINK:
            self.turn = self.anchor = n
            self.step, self.end = 0, -1
        elif token == BOUNDARY:
            self.step += 1
            self.anchor = n
        elif token == THINK_END:
            self.end = n


class SimModel(BatchModel):
    backend = "sim"
    vocab_size = VOCAB_SIZE
    eos_token_ids = (EOS,)
    bos_token_id = BOS
    think_start = "<think>"
    think_end = "</think>"

    def __init__(
        self,
        model_id: str = "sim",
        *,
        seed: int = 0,
        token_latency_s: float = 0.0,
        prefill_latency_per_token_s: float = 0.0,
        step_tokens: int = 8,
        steps: int = 6,
        hard_steps: Iterable[int] = (),
        hard_fraction: float = 0.0,
        answer_tokens: int = 4,
        context_length: int = 32768,
        n_seq: int = 4,
        n_batch: int = 512,
    ) -> None:
        if step_tokens < 2:
            raise ValueError("step_tokens must be >= 2: a step needs text before its boundary")
        self.model_id = model_id
        self.seed = seed
        self.token_latency_s = token_latency_s
        self.prefill_latency_per_token_s = prefill_latency_per_token_s
        self.step_tokens = step_tokens
        self.steps = steps
        self.hard_steps = frozenset(hard_steps)
        self.hard_fraction = hard_fraction
        self.answer_tokens = answer_tokens
        self.context_length = context_length
        self.n_seq = n_seq
        self.n_batch = n_batch
        self._index = {p: i for i, p in enumerate(_PIECES) if i >= _BYTE0}
        self._max_len = max(len(p) for p in _PIECES[_BYTE0:])
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in _SPECIALS) + ")")
        # Each sequence's tokens and where they stand in the script: the KV cache stand-in.
        self._seqs = [_Context([]) for _ in range(n_seq)]

    # ---- the script ---------------------------------------------------------------
    def is_hard(self, step: int) -> bool:
        if step in self.hard_steps:
            return True
        return self.hard_fraction > 0 and _mix(self.seed, step, 0x4A2D) < self.hard_fraction * 2.0**64

    def _logits(self, c: _Context) -> np.ndarray:
        n = len(c.tokens)
        hard = False
        if c.end >= 0:
            k = n - c.end
            h = _mix(self.seed, _ANSWER_STEP, k) % len(_CONTENT)
            token = EOS if k >= self.answer_tokens else int(_CONTENT[h])
        elif c.step >= self.steps:
            h, token = c.step % len(_CONTENT), THINK_END
        else:
            pos = n - c.anchor
            h = _mix(self.seed, c.step, pos) % len(_CONTENT)
            if pos >= self.step_tokens - 1:
                token = BOUNDARY
            else:
                token = int(_CONTENT[h])
                hard = pos == 0 and self.is_hard(c.step)
        z = _BASE.copy()
        alts = _CONTENT[(h + (_WIDE if hard else _NARROW)) % len(_CONTENT)]
        z[alts] = 0.0
        z[token] = _HARD_BUMP if hard else _PEAK
        return z

    # ---- BatchModel -------------------------------------------------------------------
    def decode(self, batch: Batch) -> np.ndarray:
        """A batch costs what it would on a GPU: one decode step (`token_latency_s`)
        however many sequences it carries, plus `prefill_latency_per_token_s` for
        each prompt token whose logits nobody reads."""
        rows = []
        for token, seq, pos, want in zip(batch.tokens, batch.seqs, batch.positions, batch.wants):
            c = self._seqs[seq]
            if pos != len(c.tokens):
                raise ValueError(f"sequence {seq} holds {len(c.tokens)} tokens; a batch put one at position {pos}")
            c.tokens.append(token)
            c.advance(token, pos + 1)
            if want:
                rows.append(self._logits(c))
        wanted = len(rows)
        delay = self.token_latency_s + self.prefill_latency_per_token_s * (len(batch) - wanted)
        if delay > 0:
            time.sleep(delay)
        return np.stack(rows) if rows else np.empty((0, VOCAB_SIZE), dtype=np.float32)

    def keep(self, seq: int, n: int) -> int:
        tokens = self._seqs[seq].tokens[:n]
        self._seqs[seq] = _Context.scan(tokens)
        return len(tokens)

    def save(self, seq: int) -> np.ndarray:
        return np.asarray(self._seqs[seq].tokens, dtype=np.int32).view(np.uint8).copy()

    def load(self, seq: int, state: np.ndarray) -> bool:
        self._seqs[seq] = _Context.scan(state.view(np.int32).tolist())
        return True

    def token_bytes(self, token_id: int) -> bytes:
        return _PIECES[token_id]

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        out = [BOS] if add_bos else []
        for part in self._special_re.split(text):
            if part in _SPECIALS:
                out.append(_SPECIALS.index(part))
                continue
            data, i = part.encode("utf-8"), 0
            while i < len(data):
                for size in range(min(self._max_len, len(data) - i), 0, -1):
                    tid = self._index.get(data[i : i + size])
                    if tid is not None:
                        break
                out.append(tid)
                i += size
        return out

    def chat_template_text(self, messages: Sequence[ChatMessage], add_generation_prompt: bool) -> str | None:
        text = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
        return text + "<|im_start|>assistant\n<think>" if add_generation_prompt else text


