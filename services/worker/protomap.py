"""The ModelWorker contract's protobuf <-> dataclass mapping, both directions, in one
place: the worker maps its results to protobuf and requests from it (after
validation.py has checked them); the router's pools map requests to protobuf and
results back. Enums map by name (FinishReason.STEP_END <-> FINISH_REASON_STEP_END),
flat messages field by field (the generic helpers are services/common/pbmap.py)."""
from __future__ import annotations

import dataclasses
import enum
from typing import Sequence, TypeVar

from glimprouter.v1 import worker_pb2 as pb
from services.common import pbmap
from services.common.pbmap import enum_to_pb, flat_from_pb, flat_to_pb
from services.worker.types import (
    Chunk,
    Decided,
    Decision,
    EntropyMethod,
    Extension,
    FinishReason,
    Gate,
    GenerateRequest,
    Generation,
    Glimpse,
    ModelInfo,
    SamplingParams,
    StepResult,
    StopParams,
    Timings,
    TokenLogprob,
    Usage,
)

E = TypeVar("E", bound=enum.Enum)


def enum_from_pb(cls: type[E], pb_enum, value: int, default: E | None = None) -> E:
    """pbmap.enum_from_pb, refusing UNSPECIFIED and unknown numbers unless a default is given."""
    out = pbmap.enum_from_pb(cls, pb_enum, value, default)
    if out is None:
        raise ValueError(f"{pb_enum.DESCRIPTOR.name} value {value} has no {cls.__name__}")
    return out


# ---- results: worker -> protobuf -> router ------------------------------------------------------
def model_info_to_pb(i: ModelInfo) -> pb.ModelInfo:
    return flat_to_pb(i, pb.ModelInfo)


def model_info_from_pb(m: pb.ModelInfo) -> ModelInfo:
    i = flat_from_pb(ModelInfo, m)
    return dataclasses.replace(i, eos_token_ids=tuple(m.eos_token_ids))


def glimpse_to_pb(g: Glimpse) -> pb.GlimpseResponse:
    return pb.GlimpseResponse(
        token_id=g.token_id,
        token_text=g.token_text,
        entropy_full=g.entropy_full,
        entropy_top_k=g.entropy_top_k,
        top=[flat_to_pb(t, pb.TokenLogprob) for t in g.top],
        usage=flat_to_pb(g.usage, pb.Usage),
        timings=flat_to_pb(g.timings, pb.Timings),
    )


def glimpse_from_pb(g: pb.GlimpseResponse, top: bool = True) -> Glimpse:
    """`top=False`: without the top tokens (a caller that reads only the entropy skips their cost)."""
    return Glimpse(
        g.token_id, g.token_text, g.entropy_full, g.entropy_top_k,
        [flat_from_pb(TokenLogprob, t) for t in g.top] if top else [], flat_from_pb(Usage, g.usage),
        flat_from_pb(Timings, g.timings),
    )


def generation_to_pb(g: Generation) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        token_ids=g.token_ids,
        text=g.text,
        finish_reason=enum_to_pb(g.finish_reason, pb.FinishReason),
        usage=flat_to_pb(g.usage, pb.Usage),
        timings=flat_to_pb(g.timings, pb.Timings),
        entropies=g.entropies,
        matched_stop=g.matched_stop,
    )


def generation_from_pb(g: pb.GenerateResponse) -> Generation:
    return Generation(
        list(g.token_ids), g.text, enum_from_pb(FinishReason, pb.FinishReason, g.finish_reason, FinishReason.LENGTH),
        flat_from_pb(Usage, g.usage), flat_from_pb(Timings, g.timings), list(g.entropies), g.matched_stop,
    )


def chunk_to_pb(c: Chunk) -> pb.GenerateChunk:
    out = pb.GenerateChunk(token_ids=c.token_ids, text=c.text, entropies=c.entropies)
    if c.final is not None:
        out.finish_reason = enum_to_pb(c.final.finish_reason, pb.FinishReason)
        out.usage.CopyFrom(flat_to_pb(c.final.usage, pb.Usage))
        out.timings.CopyFrom(flat_to_pb(c.final.timings, pb.Timings))
        out.matched_stop = c.final.matched_stop
    return out


class ChunkReader:
    """GenerateChunks -> Chunks; the last one's `final` holds the whole generation,
    assembled from every chunk read before it."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.text: list[str] = []
        self.entropies: list[float] = []

    def read(self, c: pb.GenerateChunk) -> Chunk:
        ids, entropies = list(c.token_ids), list(c.entropies)
        self.ids.extend(ids)
        self.text.append(c.text)
        self.entropies.extend(entropies)
        final = None
        if c.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            final = Generation(
                list(self.ids), "".join(self.text),
                enum_from_pb(FinishReason, pb.FinishReason, c.finish_reason, FinishReason.LENGTH),
                flat_from_pb(Usage, c.usage), flat_from_pb(Timings, c.timings), list(self.entropies), c.matched_stop,
            )
        return Chunk(ids, c.text, entropies, final)


def extension_to_pb(e: Extension) -> pb.ExtendResponse:
    return pb.ExtendResponse(usage=flat_to_pb(e.usage, pb.Usage), timings=flat_to_pb(e.timings, pb.Timings))


def extension_from_pb(r: pb.ExtendResponse) -> Extension:
    return Extension(flat_from_pb(Usage, r.usage), flat_from_pb(Timings, r.timings))


def extend_request_to_pb(prompt: Sequence[int] | None, session_id: str) -> pb.ExtendRequest:
    return pb.ExtendRequest(prompt=prompt_to_pb(prompt), session_id=session_id)


def decided_to_pb(d: Decided) -> pb.StepChunk:
    return pb.StepChunk(decision=enum_to_pb(d.decision, pb.StepDecision), entropy=d.entropy, glimpse=glimpse_to_pb(d.glimpse))


def decided_from_pb(c: pb.StepChunk, top: bool = True) -> Decided:
    return Decided(enum_from_pb(Decision, pb.StepDecision, c.decision), c.entropy, glimpse_from_pb(c.glimpse, top))


def step_to_pb(r: StepResult) -> pb.StepResponse:
    out = pb.StepResponse(decision=enum_to_pb(r.decision, pb.StepDecision), entropy=r.entropy, glimpse=glimpse_to_pb(r.glimpse))
    if r.generation is not None:
        out.generation.CopyFrom(generation_to_pb(r.generation))
    return out


def step_from_pb(r: pb.StepResponse) -> StepResult:
    decision = enum_from_pb(Decision, pb.StepDecision, r.decision)
    gen = generation_from_pb(r.generation) if decision is Decision.KEEP else None
    return StepResult(decision, r.entropy, glimpse_from_pb(r.glimpse), gen)


# ---- requests: router -> protobuf (the worker reads them back through validation.py) ---------
def prompt_to_pb(ids: Sequence[int] | None) -> pb.Prompt | None:
    """None: no prompt in the request (a Multiplex stream fills it in: router/mux.py)."""
    return None if ids is None else pb.Prompt(token_ids=pb.TokenIds(ids=ids))


def sampling_to_pb(s: SamplingParams) -> pb.Sampling:
    out = pb.Sampling(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens)
    if s.top_k:
        out.top_k = s.top_k
    if s.seed is not None:
        out.seed = s.seed
    return out


def stop_to_pb(s: StopParams) -> pb.StopCondition:
    return pb.StopCondition(step_boundary=s.step_boundary, stop=list(s.stop), stop_on_eos=s.stop_on_eos)


def generate_request_to_pb(r: GenerateRequest, with_prompt: bool = True) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=prompt_to_pb(r.prompt if with_prompt else None), sampling=sampling_to_pb(r.sampling), stop=stop_to_pb(r.stop),
        session_id=r.session_id, return_entropies=r.return_entropies, top_k=r.top_k,
    )


def step_request_to_pb(r: GenerateRequest, gate: Gate, with_prompt: bool = True) -> pb.StepRequest:
    return pb.StepRequest(
        prompt=prompt_to_pb(r.prompt if with_prompt else None), entropy_method=enum_to_pb(gate.method, pb.EntropyMethod),
        threshold=gate.threshold, top_k=r.top_k, sampling=sampling_to_pb(r.sampling), stop=stop_to_pb(r.stop),
        session_id=r.session_id,
    )


def glimpse_request_to_pb(prompt: Sequence[int] | None, top_k: int, session_id: str) -> pb.GlimpseRequest:
    return pb.GlimpseRequest(prompt=prompt_to_pb(prompt), top_k=top_k, session_id=session_id)


__all__ = [n for n in dir() if n.endswith(("_to_pb", "_from_pb")) or n in ("ChunkReader", "EntropyMethod")]
