"""Dataclass results -> protobuf responses (the other direction is validation.py)."""
from __future__ import annotations

from glimprouter.v1 import worker_pb2 as pb
from services.worker.types import Chunk, Decision, FinishReason, Generation, Glimpse, ModelInfo, StepResult, Timings, Usage

FINISH = {
    FinishReason.STEP_END: pb.FINISH_REASON_STEP_END,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.CONTEXT: pb.FINISH_REASON_CONTEXT,
}
DECISION = {Decision.KEEP: pb.STEP_DECISION_KEEP, Decision.ESCALATE: pb.STEP_DECISION_ESCALATE}


def usage(u: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=u.prompt_tokens,
        cached_tokens=u.cached_tokens,
        prefilled_tokens=u.prefilled_tokens,
        generated_tokens=u.generated_tokens,
    )


def timings(t: Timings) -> pb.Timings:
    return pb.Timings(queue_ms=t.queue_ms, prefill_ms=t.prefill_ms, decode_ms=t.decode_ms, total_ms=t.total_ms)


def model_info(i: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        model_id=i.model_id,
        backend=i.backend,
        vocab_size=i.vocab_size,
        context_length=i.context_length,
        eos_token_ids=list(i.eos_token_ids),
        bos_token_id=i.bos_token_id,
        has_chat_template=i.has_chat_template,
        tokenizer_fingerprint=i.tokenizer_fingerprint,
        think_start=i.think_start,
        think_end=i.think_end,
    )


def glimpse(g: Glimpse) -> pb.GlimpseResponse:
    return pb.GlimpseResponse(
        token_id=g.token_id,
        token_text=g.token_text,
        entropy_full=g.entropy_full,
        entropy_top_k=g.entropy_top_k,
        top=[pb.TokenLogprob(token_id=t.token_id, text=t.text, logprob=t.logprob) for t in g.top],
        usage=usage(g.usage),
        timings=timings(g.timings),
    )


def generation(g: Generation) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        token_ids=g.token_ids,
        text=g.text,
        finish_reason=FINISH[g.finish_reason],
        usage=usage(g.usage),
        timings=timings(g.timings),
        entropies=g.entropies,
        matched_stop=g.matched_stop,
    )


def step(r: StepResult) -> pb.StepResponse:
    out = pb.StepResponse(decision=DECISION[r.decision], entropy=r.entropy, glimpse=glimpse(r.glimpse))
    if r.generation is not None:
        out.generation.CopyFrom(generation(r.generation))
    return out


def chunk(c: Chunk) -> pb.GenerateChunk:
    out = pb.GenerateChunk(token_ids=c.token_ids, text=c.text, entropies=c.entropies)
    if c.final is not None:
        out.finish_reason = FINISH[c.final.finish_reason]
        out.usage.CopyFrom(usage(c.final.usage))
        out.timings.CopyFrom(timings(c.final.timings))
        out.matched_stop = c.final.matched_stop
    return out
