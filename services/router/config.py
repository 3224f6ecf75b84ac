"""Router settings: every field is a flag (--redis-url) and an env var (GLIMPROUTER_REDIS_URL)."""
from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import setting


@dataclass
class RouterSettings:
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(50051, "gRPC port (0 = pick a free one and print it)")
    metrics_port: int = setting(0, "Prometheus metrics HTTP port (0 = a free one, announced at start; -1 = off)")
    small: tuple[str, ...] = setting(("127.0.0.1:50061",), "small-model worker endpoints, comma-separated host:port")
    large: tuple[str, ...] = setting(("127.0.0.1:50062",), "large-model worker endpoints, comma-separated host:port")
    # TLS (rediss://) and AUTH (redis://user:password@host) come with the URL.
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis URL for session state", secret=True)
    redis_max_connections: int = setting(64, "connections to Redis this router opens at most (callers wait for a free one)")
    key_prefix: str = setting("glimprouter:", "prefix of every Redis key the router writes")
    session_ttl_s: int = setting(3600, "seconds a session is kept after its last write")
    lease_ms: int = setting(10000, "session lease: another router may resume a session this long after its holder stopped renewing")
    lease_renew_ms: int = setting(1000, "how often a working router renews its leases (and notices CancelSession)")
    max_prompt_tokens: int = setting(32768, "largest rendered prompt accepted")
    max_session_steps: int = setting(4096, "steps one session may hold over all its turns")
    max_sessions: int = setting(10000, "live sessions in Redis (a new one beyond that is refused)")
    max_concurrent: int = setting(512, "sessions this router works on at once")
    request_timeout_s: float = setting(600.0, "deadline for a request that carries none")
    stream_interval_ms: int = setting(50, "text a writer produces waits up to this long (at the worker, then here) to be sent with what follows it; a call's first text goes at once (0: every token as it comes, at more CPU per step)")
    stream_messages_per_s: int = setting(400, "messages a second this router sends over all its ReasonStreams at most: each stream gets an equal share (its gap grows past --stream-interval-ms when many are open), which bounds the CPU streaming costs (0: no bound)")
    catch_up: str = setting("eager", "when the model not writing a step reads it, unless a request says: eager (its worker prefills the step's tokens as they stream, off the critical path) or lazy (at its next call)", choices=["eager", "lazy"])
    catch_up_tokens: int = setting(16, "eager catch-up sends the other worker the step's tokens in chunks of this many (at most one Extend in flight per session): a switch leaves at most one chunk to prefill")
    worker_retries: int = setting(2, "retries of a failed worker call on another replica (within the deadline)")
    health_interval_s: float = setting(2.0, "seconds between health checks of each worker endpoint")
    connect_timeout_s: float = setting(60.0, "seconds to wait at startup for each pool to answer GetModelInfo")
    max_message_bytes: int = setting(16 * 1024 * 1024, "largest gRPC message")
    shutdown_grace_s: float = setting(10.0, "seconds to finish in-flight calls on SIGTERM")
    router_id: str = setting("", "name written as the lease holder (default host:pid)")
    redis_timeout_s: float = setting(5.0, "seconds a Redis command or connect may take before the request fails UNAVAILABLE")
    redis_tls_ca: str = setting("", "PEM CA bundle that signed Redis's certificate (rediss:// URLs; default: the system roots)")
    redis_tls_cert: str = setting("", "PEM client certificate for a Redis that requires one (rediss:// URLs)")
    redis_tls_key: str = setting("", "PEM private key of --redis-tls-cert")
    # TLS (services/common/tls.py): plaintext unless certificates are configured.
    tls_cert: str = setting("", "PEM certificate (chain) the router serves gRPC with; with --tls-key turns TLS on")
    tls_key: str = setting("", "PEM private key of --tls-cert")
    tls_client_ca: str = setting("", "PEM CA bundle: when set, callers (gateway, CLI) must present a client certificate it signed")
    worker_tls_ca: str = setting("", "PEM CA bundle that signed the workers' certificates; turns TLS on for calls to workers")
    worker_tls_cert: str = setting("", "PEM client certificate the router presents to workers (mutual TLS)")
    worker_tls_key: str = setting("", "PEM private key of --worker-tls-cert")
    worker_tls_server_name: str = setting("", "name the workers' certificates carry, when it is not the host dialled")
