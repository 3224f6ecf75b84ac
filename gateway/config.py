"""Gateway settings: every field is a flag (--router) and an env var (GLIMPROUTER_ROUTER)."""
from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import setting


@dataclass
class GatewaySettings:
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8080, "HTTP port (0 = pick a free one and print it)")
    router: str = setting("127.0.0.1:50051", "router gRPC endpoint host:port")
    model_name: str = setting("glimprouter", "model id clients send and /v1/models lists")
    # Keys are secrets: never printed by `describe`, never logged.
    api_keys: tuple[str, ...] = setting((), "accepted bearer tokens, comma-separated (none: no auth)", secret=True)
    api_keys_file: str = setting("", "file with one accepted bearer token per line (re-read when it changes)")
    max_body_bytes: int = setting(1024 * 1024, "largest request body accepted")
    max_concurrent: int = setting(256, "requests in flight at once; more get 429")
    request_timeout_s: float = setting(600.0, "deadline of one completion (the router gets it as the gRPC deadline)")
    ready_timeout_s: float = setting(2.0, "how long /readyz waits for the router's health answer")
    max_message_bytes: int = setting(16 * 1024 * 1024, "largest gRPC message from the router")
    log_level: str = setting("info", "log level", choices=["debug", "info", "warning", "error"])
    shutdown_grace_s: float = setting(10.0, "seconds open responses get to finish on SIGTERM before they are cut")
    # TLS (services/common/tls.py): HTTPS for clients, and TLS/mTLS to the router.
    tls_cert: str = setting("", "PEM certificate (chain) for HTTPS; with --tls-key the gateway serves https:// only")
    tls_key: str = setting("", "PEM private key of --tls-cert")
    router_tls_ca: str = setting("", "PEM CA bundle that signed the router's certificate; turns TLS on for calls to the router")
    router_tls_cert: str = setting("", "PEM client certificate the gateway presents to the router (mutual TLS)")
    router_tls_key: str = setting("", "PEM private key of --router-tls-cert")
    router_tls_server_name: str = setting("", "name the router's certificate carries, when it is not the host dialled")
