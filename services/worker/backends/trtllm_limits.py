"""What TensorRT-LLM refuses or leaves out, and what the worker does about it, decided
without calling the engine (tested anywhere, like `trtllm_mapping`): the LLM's
arguments and the context length that follows from them, the errors generate_async
raises for a request it will not take, the cap on top-k logprobs, which path a
sampled Step can take on the installed release, and what exact entropy costs.

Each rule names the file of NVIDIA/TensorRT-LLM that decides it; docs/trtllm.md says
which version of each file was read."""
from __future__ import annotations

import enum
from typing import Any, Mapping

from services.worker.backends import trtllm_mapping as m
from services.worker.types import EntropyMethod

# TorchLlmArgs defaults (tensorrt_llm/llmapi/llm_args.py, and the LLM API reference of
# 1.3.0rc7): used only to say what an unset flag means.
DEFAULT_MAX_NUM_TOKENS = 8192
DEFAULT_MAX_BATCH_SIZE = 2048


# ---- the LLM and the context it accepts ------------------------------------------


def llm_kwargs(
    model: str, *, kv_cache_config: Any, tensor_parallel_size: int = 1, trust_remote_code: bool = False,
    exact_entropy: bool = False, max_seq_len: int | None = None, max_batch_size: int | None = None,
    max_num_tokens: int | None = None, chunked_prefill: bool = True, extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for tensorrt_llm.LLM. Chunked prefill is explicit because its
    default is off (llm_args.py) and without it BaseLLM._check_arguments
    (tensorrt_llm/llmapi/llm.py) refuses every prompt longer than max_num_tokens
    (upstream issue #9277); reasoning traces pass 8k tokens routinely."""
    return {
        "model": model,
        "tensor_parallel_size": tensor_parallel_size,
        "trust_remote_code": trust_remote_code,
        "kv_cache_config": kv_cache_config,
        "enable_chunked_prefill": chunked_prefill,
        **({"gather_generation_logits": True} if exact_entropy else {}),
        **({"max_seq_len": max_seq_len} if max_seq_len else {}),
        **({"max_batch_size": max_batch_size} if max_batch_size else {}),
        **({"max_num_tokens": max_num_tokens} if max_num_tokens else {}),
        **(extra or {}),
    }


def context_length(llm_args: Mapping[str, Any], config: Mapping[str, Any]) -> int:
    """The context length the worker advertises: the one requests actually get.

    With chunked prefill it is the model's (or max_seq_len). Without, a prompt may hold
    at most max_num_tokens tokens (llm.py: `prompt_len + query_len > max_num_tokens`
    raises), and since every continuation of a step is a new prompt, that is the whole
    context; +1 because validation keeps one position free to generate into."""
    own = m.context_length(llm_args.get("max_seq_len"), config)
    if llm_args.get("enable_chunked_prefill"):
        return own
    return min(own, int(llm_args.get("max_num_tokens") or DEFAULT_MAX_NUM_TOKENS) + 1)


def describe(llm_args: Mapping[str, Any], context_length: int, exact_entropy: bool) -> str:
    """Engine.describe(): what the worker runs with, for its start line; an unset limit
    is shown with TRT's default."""

    def limit(key: str, default: int) -> str:
        value = llm_args.get(key)
        return str(value) if value else f"{default}(default)"

    on = {True: "on", False: "off"}
    return (f"context={context_length} chunked_prefill={on[bool(llm_args.get('enable_chunked_prefill'))]} "
            f"max_num_tokens={limit('max_num_tokens', DEFAULT_MAX_NUM_TOKENS)} "
            f"max_batch_size={limit('max_batch_size', DEFAULT_MAX_BATCH_SIZE)} "
            f"exact_entropy={on[bool(exact_entropy)]} tensor_parallel={llm_args.get('tensor_parallel_size', 1)}")


# ---- requests TensorRT-LLM refuses -----------------------------------------------


def is_refusal(exc: BaseException) -> bool:
    """An error generate_async raises for a request it will not take: ValueError in 1.2
    (BaseLLM._check_arguments, SamplingParams._validate), and in later releases
    tensorrt_llm.executor.utils.RequestError, a RuntimeError, for the same prompt-length
    check. Matched by name so this module needs no tensorrt_llm."""
    if isinstance(exc, ValueError):
        return True
    return any(c.__name__ == "RequestError" and c.__module__.startswith("tensorrt_llm") for c in type(exc).__mro__)


def refusal_message(exc: BaseException, prompt_tokens: int) -> str:
    text = f"TensorRT-LLM refused a request of {prompt_tokens} prompt tokens: {exc}"
    if "max_num_tokens" in str(exc):
        text += " (start the worker with --trtllm-chunked-prefill, the default, or a larger --trtllm-max-num-tokens)"
    return text


def logprobs_cap(value: Any) -> int | None:
    """tensorrt_llm.sampling_params.MAX_TOP_LOGPROBS, which check_logprobs_limit holds
    SamplingParams.logprobs to: 20 where it appeared, 100 since upstream PR #16851.
    None (no known cap) on releases without it."""
    try:
        cap = int(value)
    except (TypeError, ValueError):
        return None
    return cap if cap > 0 else None


def check_logprobs(top_k: int, cap: int | None, *, exact_entropy_helps: bool) -> None:
    """Refuse, naming the limit, a top-k TensorRT-LLM would refuse anyway with a less
    useful message. Not clamped: a top-20 entropy compared with a threshold tuned for
    top-32 would silently change every decision."""
    if cap is None or top_k <= cap:
        return
    hint = (" or start the worker with --trtllm-exact-entropy, which reads Glimpse and Step entropies from the logits"
            if exact_entropy_helps else "")
    raise ValueError(
        f"top_k {top_k} asks for more log-probabilities than this TensorRT-LLM returns per token "
        f"(at most {cap}, tensorrt_llm.sampling_params.MAX_TOP_LOGPROBS); use top_k <= {cap}{hint}"
    )


# ---- how a sampled Step gets its first token ---------------------------------------


def raw_logprobs_mode(fields: Mapping[str, Any]) -> Any:
    """What to send as SamplingParams.logprobs_mode for "before temperature and
    top-k/top-p", given SamplingParams' fields and their defaults; None when the release
    has no such field. The field (LogprobMode, RAW as default) came with upstream PR
    #9675, which is not in every 1.2.x; the member named RAW is sent, whatever its value."""
    if "logprobs_mode" not in fields:
        return None
    default = fields["logprobs_mode"]
    if isinstance(default, enum.Enum):
        members = type(default)
        by_value = {str(v.value): v for v in members}
        return members.__members__.get("RAW", by_value.get("raw"))
    return "raw" if str(default) == "raw" else None


class StepPath(str, enum.Enum):
    """How a Step obtained its first token: a metric label, so a release that sends
    every sampled Step down two requests shows up on a dashboard."""

    GREEDY = "greedy"  # the glimpse's argmax
    LOGITS = "one_request_logits"  # sampled in the glimpse request; entropy from generation logits
    RAW_LOGPROBS = "one_request_raw_logprobs"  # sampled in the glimpse request; raw logprobs
    NO_LOGPROBS_MODE = "two_requests_no_logprobs_mode"  # glimpse at T=1, then regenerate
    REFUSED = "two_requests_refused"  # TRT refused the one-request parameters


def check_gate(method: EntropyMethod, exact_entropy: bool) -> None:
    """The full-vocabulary entropy exists only with generation logits."""
    if method is EntropyMethod.FULL and not exact_entropy:
        raise ValueError("full-vocabulary entropy needs the worker started with --trtllm-exact-entropy")


def step_path(greedy: bool, exact_entropy: bool, raw_mode: Any) -> StepPath:
    if greedy:
        return StepPath.GREEDY
    if exact_entropy:
        return StepPath.LOGITS
    return StepPath.RAW_LOGPROBS if raw_mode is not None else StepPath.NO_LOGPROBS_MODE


def describe_sampled_steps(exact_entropy: bool, raw_mode: Any) -> str:
    """One log line at start: which path sampled Steps take on this release."""
    path = step_path(False, exact_entropy, raw_mode)
    if path is StepPath.LOGITS:
        return ("sampled Steps: one request (first token sampled with the step's parameters; "
                "entropy from the generation logits)")
    if path is StepPath.RAW_LOGPROBS:
        return (f"sampled Steps: one request (first token sampled with the step's parameters; "
                f"entropy from raw logprobs, SamplingParams.logprobs_mode={raw_mode!s})")
    return ("sampled Steps: two requests (this TensorRT-LLM has no SamplingParams.logprobs_mode, "
            "upstream PR #9675, so logprobs follow the sampling parameters: a temperature-1 glimpse, "
            "then the step regenerated from the boundary)")


# Per-request seeds: TorchSampler, the default sampler ("auto" picks it unless beam
# search is asked for), draws from one generator seeded once for the whole executor
# (tensorrt_llm/_torch/pyexecutor/sampler.py, `_global_seed = 42`) until upstream PR
# #17172. The seed is still sent, for releases and samplers that honour it.
SEED_NOTE = ("per-request seeds are sent but TensorRT-LLM's default TorchSampler ignores them before "
             "upstream PR #17172: sampled tokens are not reproducible from a seed")


# ---- what exact entropy costs ---------------------------------------------------


def logits_buffer_bytes(max_batch_size: int | None, vocab_size: int) -> int:
    """An estimate, not a measurement: with gather_generation_logits the executor keeps
    float32 logits for every sequence it may batch, max_batch_size x vocab_size x 4
    bytes (upstream tests/unittest/_torch/sampler/test_return_logits.py lowers
    max_batch_size to 128 "to reduce buffer sizes, specially for generation logits")."""
    return int(max_batch_size or DEFAULT_MAX_BATCH_SIZE) * int(vocab_size) * 4
