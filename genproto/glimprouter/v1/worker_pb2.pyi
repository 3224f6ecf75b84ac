from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EntropyMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENTROPY_METHOD_UNSPECIFIED: _ClassVar[EntropyMethod]
    ENTROPY_METHOD_TOP_K: _ClassVar[EntropyMethod]
    ENTROPY_METHOD_FULL: _ClassVar[EntropyMethod]

class StepDecision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEP_DECISION_UNSPECIFIED: _ClassVar[StepDecision]
    STEP_DECISION_KEEP: _ClassVar[StepDecision]
    STEP_DECISION_ESCALATE: _ClassVar[StepDecision]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STEP_END: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
    FINISH_REASON_CONTEXT: _ClassVar[FinishReason]
ENTROPY_METHOD_UNSPECIFIED: EntropyMethod
ENTROPY_METHOD_TOP_K: EntropyMethod
ENTROPY_METHOD_FULL: EntropyMethod
STEP_DECISION_UNSPECIFIED: StepDecision
STEP_DECISION_KEEP: StepDecision
STEP_DECISION_ESCALATE: StepDecision
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STEP_END: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_CANCELLED: FinishReason
FINISH_REASON_CONTEXT: FinishReason

class Prompt(_message.Message):
    __slots__ = ("token_ids", "text", "delta")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    token_ids: TokenIds
    text: str
    delta: PromptDelta
    def __init__(self, token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., text: _Optional[str] = ..., delta: _Optional[_Union[PromptDelta, _Mapping]] = ...) -> None: ...

class PromptDelta(_message.Message):
    __slots__ = ("keep", "ids")
    KEEP_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    keep: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, keep: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed", "max_tokens")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    max_tokens: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class StopCondition(_message.Message):
    __slots__ = ("step_boundary", "stop", "stop_on_eos")
    STEP_BOUNDARY_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_ON_EOS_FIELD_NUMBER: _ClassVar[int]
    step_boundary: str
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_on_eos: bool
    def __init__(self, step_boundary: _Optional[str] = ..., stop: _Optional[_Iterable[str]] = ..., stop_on_eos: _Optional[bool] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "cached_tokens", "prefilled_tokens", "generated_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILLED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    generated_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., prefilled_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "prefill_ms", "decode_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    prefill_ms: float
    decode_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "backend", "vocab_size", "context_length", "eos_token_ids", "bos_token_id", "has_chat_template", "tokenizer_fingerprint", "think_start", "think_end")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    THINK_START_FIELD_NUMBER: _ClassVar[int]
    THINK_END_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    backend: str
    vocab_size: int
    context_length: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    bos_token_id: int
    has_chat_template: bool
    tokenizer_fingerprint: str
    think_start: str
    think_end: str
    def __init__(self, model_id: _Optional[str] = ..., backend: _Optional[str] = ..., vocab_size: _Optional[int] = ..., context_length: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., bos_token_id: _Optional[int] = ..., has_chat_template: _Optional[bool] = ..., tokenizer_fingerprint: _Optional[str] = ..., think_start: _Optional[str] = ..., think_end: _Optional[str] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class RenderPromptRequest(_message.Message):
    __slots__ = ("messages", "add_generation_prompt", "continue_final_message")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    ADD_GENERATION_PROMPT_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_FINAL_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    add_generation_prompt: bool
    continue_final_message: bool
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., add_generation_prompt: _Optional[bool] = ..., continue_final_message: _Optional[bool] = ...) -> None: ...

class RenderPromptResponse(_message.Message):
    __slots__ = ("token_ids", "text")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "text", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    text: str
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class GlimpseRequest(_message.Message):
    __slots__ = ("prompt", "top_k", "session_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    top_k: int
    session_id: str
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., top_k: _Optional[int] = ..., session_id: _Optional[str] = ...) -> None: ...

class GlimpseResponse(_message.Message):
    __slots__ = ("token_id", "token_text", "entropy_full", "entropy_top_k", "top", "usage", "timings")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TEXT_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FULL_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token_text: str
    entropy_full: float
    entropy_top_k: float
    top: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    usage: Usage
    timings: Timings
    def __init__(self, token_id: _Optional[int] = ..., token_text: _Optional[str] = ..., entropy_full: _Optional[float] = ..., entropy_top_k: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("prompt", "entropy_method", "threshold", "top_k", "sampling", "stop", "session_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_METHOD_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    entropy_method: EntropyMethod
    threshold: float
    top_k: int
    sampling: Sampling
    stop: StopCondition
    session_id: str
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., entropy_method: _Optional[_Union[EntropyMethod, str]] = ..., threshold: _Optional[float] = ..., top_k: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., stop: _Optional[_Union[StopCondition, _Mapping]] = ..., session_id: _Optional[str] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("decision", "entropy", "glimpse", "generation")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    GLIMPSE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    decision: StepDecision
    entropy: float
    glimpse: GlimpseResponse
    generation: GenerateResponse
    def __init__(self, decision: _Optional[_Union[StepDecision, str]] = ..., entropy: _Optional[float] = ..., glimpse: _Optional[_Union[GlimpseResponse, _Mapping]] = ..., generation: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class ExtendRequest(_message.Message):
    __slots__ = ("prompt", "session_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    session_id: str
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., session_id: _Optional[str] = ...) -> None: ...

class ExtendResponse(_message.Message):
    __slots__ = ("usage", "timings")
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    usage: Usage
    timings: Timings
    def __init__(self, usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class StepChunk(_message.Message):
    __slots__ = ("decision", "entropy", "glimpse", "chunk")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    GLIMPSE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    decision: StepDecision
    entropy: float
    glimpse: GlimpseResponse
    chunk: GenerateChunk
    def __init__(self, decision: _Optional[_Union[StepDecision, str]] = ..., entropy: _Optional[float] = ..., glimpse: _Optional[_Union[GlimpseResponse, _Mapping]] = ..., chunk: _Optional[_Union[GenerateChunk, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "sampling", "stop", "session_id", "return_entropies", "top_k")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RETURN_ENTROPIES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    sampling: Sampling
    stop: StopCondition
    session_id: str
    return_entropies: bool
    top_k: int
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., stop: _Optional[_Union[StopCondition, _Mapping]] = ..., session_id: _Optional[str] = ..., return_entropies: _Optional[bool] = ..., top_k: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token_ids", "text", "finish_reason", "usage", "timings", "entropies", "matched_stop")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ENTROPIES_FIELD_NUMBER: _ClassVar[int]
    MATCHED_STOP_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    entropies: _containers.RepeatedScalarFieldContainer[float]
    matched_stop: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., entropies: _Optional[_Iterable[float]] = ..., matched_stop: _Optional[str] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("token_ids", "text", "entropies", "finish_reason", "usage", "timings", "matched_stop")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ENTROPIES_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MATCHED_STOP_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    entropies: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    matched_stop: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., entropies: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., matched_stop: _Optional[str] = ...) -> None: ...

class MuxCall(_message.Message):
    __slots__ = ("id", "render_prompt", "tokenize", "glimpse", "step", "generate", "cancel", "extend", "timeout_ms", "traceparent", "coalesce_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    RENDER_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TOKENIZE_FIELD_NUMBER: _ClassVar[int]
    GLIMPSE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    EXTEND_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    COALESCE_MS_FIELD_NUMBER: _ClassVar[int]
    id: int
    render_prompt: RenderPromptRequest
    tokenize: TokenizeRequest
    glimpse: GlimpseRequest
    step: StepRequest
    generate: GenerateRequest
    cancel: bool
    extend: ExtendRequest
    timeout_ms: int
    traceparent: str
    coalesce_ms: int
    def __init__(self, id: _Optional[int] = ..., render_prompt: _Optional[_Union[RenderPromptRequest, _Mapping]] = ..., tokenize: _Optional[_Union[TokenizeRequest, _Mapping]] = ..., glimpse: _Optional[_Union[GlimpseRequest, _Mapping]] = ..., step: _Optional[_Union[StepRequest, _Mapping]] = ..., generate: _Optional[_Union[GenerateRequest, _Mapping]] = ..., cancel: _Optional[bool] = ..., extend: _Optional[_Union[ExtendRequest, _Mapping]] = ..., timeout_ms: _Optional[int] = ..., traceparent: _Optional[str] = ..., coalesce_ms: _Optional[int] = ...) -> None: ...

class MuxRequest(_message.Message):
    __slots__ = ("calls",)
    CALLS_FIELD_NUMBER: _ClassVar[int]
    calls: _containers.RepeatedCompositeFieldContainer[MuxCall]
    def __init__(self, calls: _Optional[_Iterable[_Union[MuxCall, _Mapping]]] = ...) -> None: ...

class MuxStatus(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class MuxResult(_message.Message):
    __slots__ = ("id", "render_prompt", "tokenize", "glimpse", "step", "chunk", "error", "extend", "last")
    ID_FIELD_NUMBER: _ClassVar[int]
    RENDER_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TOKENIZE_FIELD_NUMBER: _ClassVar[int]
    GLIMPSE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EXTEND_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    id: int
    render_prompt: RenderPromptResponse
    tokenize: TokenizeResponse
    glimpse: GlimpseResponse
    step: StepChunk
    chunk: GenerateChunk
    error: MuxStatus
    extend: ExtendResponse
    last: bool
    def __init__(self, id: _Optional[int] = ..., render_prompt: _Optional[_Union[RenderPromptResponse, _Mapping]] = ..., tokenize: _Optional[_Union[TokenizeResponse, _Mapping]] = ..., glimpse: _Optional[_Union[GlimpseResponse, _Mapping]] = ..., step: _Optional[_Union[StepChunk, _Mapping]] = ..., chunk: _Optional[_Union[GenerateChunk, _Mapping]] = ..., error: _Optional[_Union[MuxStatus, _Mapping]] = ..., extend: _Optional[_Union[ExtendResponse, _Mapping]] = ..., last: _Optional[bool] = ...) -> None: ...

class MuxReply(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[MuxResult]
    def __init__(self, results: _Optional[_Iterable[_Union[MuxResult, _Mapping]]] = ...) -> None: ...
