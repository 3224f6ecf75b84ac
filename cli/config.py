"""Settings of the CLI's commands: each field is a flag and a GLIMPROUTER_* env var
(services/common/settings.py), so `--router` and GLIMPROUTER_ROUTER mean the same
here as in the gateway."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional  # settings.py reads typing.Optional, not `X | None`

from services.common.settings import setting

DEMO_QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


@dataclass
class RouterTarget:
    router: str = setting("127.0.0.1:50051", "router gRPC endpoint host:port")
    color: str = setting("auto", "colour output", choices=["auto", "always", "never"])
    # The same names as the gateway's, so one set of GLIMPROUTER_ROUTER_TLS_* serves both.
    router_tls_ca: str = setting("", "PEM CA bundle that signed the router's certificate (turns TLS on)")
    router_tls_cert: str = setting("", "PEM client certificate for a router that requires one (mutual TLS)")
    router_tls_key: str = setting("", "PEM private key of --router-tls-cert")
    router_tls_server_name: str = setting("", "name the router's certificate carries, when it is not the host dialled")

    def router_client(self):
        from services.router.api.client import RouterClient
        from services.common.tls import ClientTLS

        tls = ClientTLS(self.router_tls_ca, self.router_tls_cert, self.router_tls_key, self.router_tls_server_name)
        return RouterClient(self.router, tls=tls)


@dataclass
class AskSettings(RouterTarget):
    session: str = setting("", "continue this session with a new turn (default: a new session)")
    policy: str = setting("", "routing policy: glimpse, large-only, small-only, random, verify, step-entropy, adaptive")
    threshold: Optional[float] = setting(None, "tau: steps whose glimpse entropy (nats) is >= this go to the large model")
    params: tuple[str, ...] = setting((), "policy parameters as name=value, comma-separated (e.g. p=0.3)")
    glimpse_mode: str = setting("", "fused (one call on the small worker) or separate (the paper's two calls)",
                                choices=["fused", "separate"])
    max_steps: Optional[int] = setting(None, "steps in this turn at most")
    step_tokens: Optional[int] = setting(None, "tokens per step at most (router default 512)")
    thinking_tokens: Optional[int] = setting(None, "step tokens in this turn at most (router default 8192)")
    answer_tokens: Optional[int] = setting(None, "answer tokens at most (router default 2048)")
    temperature: Optional[float] = setting(None, "sampling temperature (router default 0.6; 0 = greedy)")
    seed: Optional[int] = setting(None, "sampling seed (default: random, stored with the session)")
    answer_by: str = setting("auto", "who writes the answer after the steps", choices=["auto", "large", "small", "none"])
    timeout_s: float = setting(600.0, "deadline of the whole request")


@dataclass
class SessionSettings(RouterTarget):
    format: str = setting("table", "output format", choices=["table", "json"])


@dataclass
class UpSettings:
    host: str = setting("127.0.0.1", "address every service listens on")
    gateway_port: int = setting(8080, "gateway HTTP port (0 = a free one)")
    router_port: int = setting(50051, "router gRPC port (0 = a free one)")
    small_model: str = setting("qwen2.5-coder-0.5b", "small model: a manifest id (fetched if missing) or a GGUF path")
    large_model: str = setting("qwen2.5-coder-1.5b", "large model: a manifest id (fetched if missing) or a GGUF path")
    backend: str = setting("llamacpp", "worker backend", choices=["llamacpp", "trtllm", "sim"])
    threads: int = setting(0, "CPU threads per worker (0 = every core it may run on)")
    context_length: int = setting(4096, "context window of each worker in tokens")
    catch_up: str = setting("lazy", "the router's catch-up default: lazy here, as both workers share this machine's cores and eager catch-up would compete with the writing model for them (docs/router.md, \"Catch-up\"); eager on separate nodes", choices=["eager", "lazy"])
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis for sessions; a private redis-server is started when none answers", secret=True)
    private_redis: bool = setting(False, "always start a private redis-server, even when one answers at --redis-url")
    demo: bool = setting(False, "ask one sample question once everything is up, showing how its steps are routed")
    demo_question: str = setting(DEMO_QUESTION, "the question --demo asks")
    demo_thinking_tokens: int = setting(1024, "step-token budget of the demo question")
    start_timeout_s: float = setting(300.0, "seconds each service gets to become ready")
    verbose: bool = setting(False, "echo every service's log lines")
    color: str = setting("auto", "colour output", choices=["auto", "always", "never"])
