from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CatchUp(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CATCH_UP_UNSPECIFIED: _ClassVar[CatchUp]
    CATCH_UP_EAGER: _ClassVar[CatchUp]
    CATCH_UP_LAZY: _ClassVar[CatchUp]

class GlimpseMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GLIMPSE_MODE_UNSPECIFIED: _ClassVar[GlimpseMode]
    GLIMPSE_MODE_FUSED: _ClassVar[GlimpseMode]
    GLIMPSE_MODE_SEPARATE: _ClassVar[GlimpseMode]

class Entropy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENTROPY_UNSPECIFIED: _ClassVar[Entropy]
    ENTROPY_TOP_K: _ClassVar[Entropy]
    ENTROPY_FULL: _ClassVar[Entropy]

class AnswerBy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ANSWER_BY_UNSPECIFIED: _ClassVar[AnswerBy]
    ANSWER_BY_LARGE: _ClassVar[AnswerBy]
    ANSWER_BY_SMALL: _ClassVar[AnswerBy]
    ANSWER_BY_NONE: _ClassVar[AnswerBy]

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_SMALL: _ClassVar[Role]
    ROLE_LARGE: _ClassVar[Role]

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_SMALL: _ClassVar[Decision]
    DECISION_LARGE: _ClassVar[Decision]

class PrefixMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PREFIX_MODE_UNSPECIFIED: _ClassVar[PrefixMode]
    PREFIX_MODE_TOKENS: _ClassVar[PrefixMode]
    PREFIX_MODE_TEXT: _ClassVar[PrefixMode]
CATCH_UP_UNSPECIFIED: CatchUp
CATCH_UP_EAGER: CatchUp
CATCH_UP_LAZY: CatchUp
GLIMPSE_MODE_UNSPECIFIED: GlimpseMode
GLIMPSE_MODE_FUSED: GlimpseMode
GLIMPSE_MODE_SEPARATE: GlimpseMode
ENTROPY_UNSPECIFIED: Entropy
ENTROPY_TOP_K: Entropy
ENTROPY_FULL: Entropy
ANSWER_BY_UNSPECIFIED: AnswerBy
ANSWER_BY_LARGE: AnswerBy
ANSWER_BY_SMALL: AnswerBy
ANSWER_BY_NONE: AnswerBy
ROLE_UNSPECIFIED: Role
ROLE_SMALL: Role
ROLE_LARGE: Role
DECISION_UNSPECIFIED: Decision
DECISION_SMALL: Decision
DECISION_LARGE: Decision
PREFIX_MODE_UNSPECIFIED: PrefixMode
PREFIX_MODE_TOKENS: PrefixMode
PREFIX_MODE_TEXT: PrefixMode

class Message(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class RoutingOptions(_message.Message):
    __slots__ = ("policy", "threshold", "params", "glimpse_mode", "entropy", "top_k", "catch_up")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    POLICY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    GLIMPSE_MODE_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    CATCH_UP_FIELD_NUMBER: _ClassVar[int]
    policy: str
    threshold: float
    params: _containers.ScalarMap[str, float]
    glimpse_mode: GlimpseMode
    entropy: Entropy
    top_k: int
    catch_up: CatchUp
    def __init__(self, policy: _Optional[str] = ..., threshold: _Optional[float] = ..., params: _Optional[_Mapping[str, float]] = ..., glimpse_mode: _Optional[_Union[GlimpseMode, str]] = ..., entropy: _Optional[_Union[Entropy, str]] = ..., top_k: _Optional[int] = ..., catch_up: _Optional[_Union[CatchUp, str]] = ...) -> None: ...

class Budgets(_message.Message):
    __slots__ = ("step_tokens", "thinking_tokens", "answer_tokens", "max_steps")
    STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    THINKING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    step_tokens: int
    thinking_tokens: int
    answer_tokens: int
    max_steps: int
    def __init__(self, step_tokens: _Optional[int] = ..., thinking_tokens: _Optional[int] = ..., answer_tokens: _Optional[int] = ..., max_steps: _Optional[int] = ...) -> None: ...

class SamplingOptions(_message.Message):
    __slots__ = ("temperature", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class ReasonRequest(_message.Message):
    __slots__ = ("session_id", "messages", "prompt", "routing", "budgets", "sampling", "answer_by", "think", "include_token_ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ANSWER_BY_FIELD_NUMBER: _ClassVar[int]
    THINK_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    prompt: str
    routing: RoutingOptions
    budgets: Budgets
    sampling: SamplingOptions
    answer_by: AnswerBy
    think: bool
    include_token_ids: bool
    def __init__(self, session_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., prompt: _Optional[str] = ..., routing: _Optional[_Union[RoutingOptions, _Mapping]] = ..., budgets: _Optional[_Union[Budgets, _Mapping]] = ..., sampling: _Optional[_Union[SamplingOptions, _Mapping]] = ..., answer_by: _Optional[_Union[AnswerBy, str]] = ..., think: _Optional[bool] = ..., include_token_ids: _Optional[bool] = ...) -> None: ...

class StepStart(_message.Message):
    __slots__ = ("index", "turn", "role", "model_id", "decision", "entropy", "threshold", "attempt")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    index: int
    turn: int
    role: Role
    model_id: str
    decision: Decision
    entropy: float
    threshold: float
    attempt: int
    def __init__(self, index: _Optional[int] = ..., turn: _Optional[int] = ..., role: _Optional[_Union[Role, str]] = ..., model_id: _Optional[str] = ..., decision: _Optional[_Union[Decision, str]] = ..., entropy: _Optional[float] = ..., threshold: _Optional[float] = ..., attempt: _Optional[int] = ...) -> None: ...

class StepDelta(_message.Message):
    __slots__ = ("index", "text", "tokens", "token_ids")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    tokens: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., tokens: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class StepEvent(_message.Message):
    __slots__ = ("index", "turn", "role", "model_id", "decision", "entropy", "threshold", "text", "tokens", "discarded_tokens", "cached_tokens", "prefilled_tokens", "latency_ms", "worker_ms", "finish_reason", "token_ids", "critical_prefill_tokens", "critical_prefill_ms")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILLED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    WORKER_MS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CRITICAL_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CRITICAL_PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    index: int
    turn: int
    role: Role
    model_id: str
    decision: Decision
    entropy: float
    threshold: float
    text: str
    tokens: int
    discarded_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    latency_ms: float
    worker_ms: float
    finish_reason: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    critical_prefill_tokens: int
    critical_prefill_ms: float
    def __init__(self, index: _Optional[int] = ..., turn: _Optional[int] = ..., role: _Optional[_Union[Role, str]] = ..., model_id: _Optional[str] = ..., decision: _Optional[_Union[Decision, str]] = ..., entropy: _Optional[float] = ..., threshold: _Optional[float] = ..., text: _Optional[str] = ..., tokens: _Optional[int] = ..., discarded_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., prefilled_tokens: _Optional[int] = ..., latency_ms: _Optional[float] = ..., worker_ms: _Optional[float] = ..., finish_reason: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., critical_prefill_tokens: _Optional[int] = ..., critical_prefill_ms: _Optional[float] = ...) -> None: ...

class RoleStats(_message.Message):
    __slots__ = ("steps", "generated_tokens", "discarded_tokens", "glimpses", "prefilled_tokens", "cached_tokens", "worker_ms")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GLIMPSES_FIELD_NUMBER: _ClassVar[int]
    PREFILLED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WORKER_MS_FIELD_NUMBER: _ClassVar[int]
    steps: int
    generated_tokens: int
    discarded_tokens: int
    glimpses: int
    prefilled_tokens: int
    cached_tokens: int
    worker_ms: float
    def __init__(self, steps: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., discarded_tokens: _Optional[int] = ..., glimpses: _Optional[int] = ..., prefilled_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., worker_ms: _Optional[float] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("latency_ms", "steps", "intervention_rate", "small", "large", "thinking_tokens", "answer_tokens", "thinking_end", "answer_end", "resumed_steps", "prompt_tokens")
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    INTERVENTION_RATE_FIELD_NUMBER: _ClassVar[int]
    SMALL_FIELD_NUMBER: _ClassVar[int]
    LARGE_FIELD_NUMBER: _ClassVar[int]
    THINKING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    THINKING_END_FIELD_NUMBER: _ClassVar[int]
    ANSWER_END_FIELD_NUMBER: _ClassVar[int]
    RESUMED_STEPS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    latency_ms: float
    steps: int
    intervention_rate: float
    small: RoleStats
    large: RoleStats
    thinking_tokens: int
    answer_tokens: int
    thinking_end: str
    answer_end: str
    resumed_steps: int
    prompt_tokens: int
    def __init__(self, latency_ms: _Optional[float] = ..., steps: _Optional[int] = ..., intervention_rate: _Optional[float] = ..., small: _Optional[_Union[RoleStats, _Mapping]] = ..., large: _Optional[_Union[RoleStats, _Mapping]] = ..., thinking_tokens: _Optional[int] = ..., answer_tokens: _Optional[int] = ..., thinking_end: _Optional[str] = ..., answer_end: _Optional[str] = ..., resumed_steps: _Optional[int] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class SessionStarted(_message.Message):
    __slots__ = ("session_id", "turn", "prefix_mode", "resumed_steps", "small_model", "large_model", "thinking")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    PREFIX_MODE_FIELD_NUMBER: _ClassVar[int]
    RESUMED_STEPS_FIELD_NUMBER: _ClassVar[int]
    SMALL_MODEL_FIELD_NUMBER: _ClassVar[int]
    LARGE_MODEL_FIELD_NUMBER: _ClassVar[int]
    THINKING_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    turn: int
    prefix_mode: PrefixMode
    resumed_steps: int
    small_model: str
    large_model: str
    thinking: bool
    def __init__(self, session_id: _Optional[str] = ..., turn: _Optional[int] = ..., prefix_mode: _Optional[_Union[PrefixMode, str]] = ..., resumed_steps: _Optional[int] = ..., small_model: _Optional[str] = ..., large_model: _Optional[str] = ..., thinking: _Optional[bool] = ...) -> None: ...

class AnswerDelta(_message.Message):
    __slots__ = ("text", "role", "tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    role: Role
    tokens: int
    def __init__(self, text: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., tokens: _Optional[int] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ("session_id", "answer", "stats")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    answer: str
    stats: Stats
    def __init__(self, session_id: _Optional[str] = ..., answer: _Optional[str] = ..., stats: _Optional[_Union[Stats, _Mapping]] = ...) -> None: ...

class ReasonEvent(_message.Message):
    __slots__ = ("started", "step", "answer", "done", "step_start", "step_delta")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    STEP_START_FIELD_NUMBER: _ClassVar[int]
    STEP_DELTA_FIELD_NUMBER: _ClassVar[int]
    started: SessionStarted
    step: StepEvent
    answer: AnswerDelta
    done: Done
    step_start: StepStart
    step_delta: StepDelta
    def __init__(self, started: _Optional[_Union[SessionStarted, _Mapping]] = ..., step: _Optional[_Union[StepEvent, _Mapping]] = ..., answer: _Optional[_Union[AnswerDelta, _Mapping]] = ..., done: _Optional[_Union[Done, _Mapping]] = ..., step_start: _Optional[_Union[StepStart, _Mapping]] = ..., step_delta: _Optional[_Union[StepDelta, _Mapping]] = ...) -> None: ...

class ReasonEvents(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[ReasonEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[ReasonEvent, _Mapping]]] = ...) -> None: ...

class ReasonResponse(_message.Message):
    __slots__ = ("session_id", "turn", "prefix_mode", "steps", "answer", "stats")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    PREFIX_MODE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    turn: int
    prefix_mode: PrefixMode
    steps: _containers.RepeatedCompositeFieldContainer[StepEvent]
    answer: str
    stats: Stats
    def __init__(self, session_id: _Optional[str] = ..., turn: _Optional[int] = ..., prefix_mode: _Optional[_Union[PrefixMode, str]] = ..., steps: _Optional[_Iterable[_Union[StepEvent, _Mapping]]] = ..., answer: _Optional[str] = ..., stats: _Optional[_Union[Stats, _Mapping]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id", "include_prefix")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    include_prefix: bool
    def __init__(self, session_id: _Optional[str] = ..., include_prefix: _Optional[bool] = ...) -> None: ...

class PrefixView(_message.Message):
    __slots__ = ("name", "length", "token_ids")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    length: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., length: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "status", "prefix_mode", "turn", "small_model", "large_model", "options_json", "steps", "prefixes", "lease_holder", "lease_ms_left", "answer", "stats", "affinity", "created_unix_ms", "updated_unix_ms", "error", "trace_ids")
    class AffinityEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_MODE_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    SMALL_MODEL_FIELD_NUMBER: _ClassVar[int]
    LARGE_MODEL_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PREFIXES_FIELD_NUMBER: _ClassVar[int]
    LEASE_HOLDER_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_LEFT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    AFFINITY_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TRACE_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    status: str
    prefix_mode: PrefixMode
    turn: int
    small_model: str
    large_model: str
    options_json: str
    steps: _containers.RepeatedCompositeFieldContainer[StepEvent]
    prefixes: _containers.RepeatedCompositeFieldContainer[PrefixView]
    lease_holder: str
    lease_ms_left: int
    answer: str
    stats: Stats
    affinity: _containers.ScalarMap[str, str]
    created_unix_ms: int
    updated_unix_ms: int
    error: str
    trace_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., status: _Optional[str] = ..., prefix_mode: _Optional[_Union[PrefixMode, str]] = ..., turn: _Optional[int] = ..., small_model: _Optional[str] = ..., large_model: _Optional[str] = ..., options_json: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[StepEvent, _Mapping]]] = ..., prefixes: _Optional[_Iterable[_Union[PrefixView, _Mapping]]] = ..., lease_holder: _Optional[str] = ..., lease_ms_left: _Optional[int] = ..., answer: _Optional[str] = ..., stats: _Optional[_Union[Stats, _Mapping]] = ..., affinity: _Optional[_Mapping[str, str]] = ..., created_unix_ms: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ..., error: _Optional[str] = ..., trace_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class CancelSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CancelSessionResponse(_message.Message):
    __slots__ = ("cancelled", "status")
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    status: str
    def __init__(self, cancelled: _Optional[bool] = ..., status: _Optional[str] = ...) -> None: ...
