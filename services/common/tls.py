"""TLS for every gRPC hop, configured by certificate paths.

Servers (worker, router): a certificate and its key turn TLS on; a client CA on
top makes the server require a client certificate signed by that CA (mutual
TLS). Clients (router -> workers, gateway and CLI -> router): a CA bundle turns
TLS on and verifies the server; a certificate and key are presented when the
server asks for one. With nothing configured a hop is plaintext, and the
process says so in one log line at start-up, so plaintext is never silent.

Files are read once at start-up: rotating certificates means restarting the
process (Kubernetes rolls the pods when the mounted secret changes).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc

log = logging.getLogger("glimprouter.tls")


class TLSConfigError(SystemExit):
    """A certificate setting that cannot work; raised at start-up, never later."""

    def __init__(self, message: str) -> None:
        super().__init__(f"TLS configuration: {message}")


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read the {what} {path!r}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise TLSConfigError(f"the {what} {path!r} is not PEM (no -----BEGIN line)")
    return data


@dataclass(frozen=True)
class ServerTLS:
    """A gRPC server's side: `cert`/`key` for TLS, `client_ca` to require client certificates."""

    cert: str = ""
    key: str = ""
    client_ca: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key or self.client_ca)

    @property
    def mode(self) -> str:
        if not self.enabled:
            return "plaintext"
        return "mtls" if self.client_ca else "tls"

    def credentials(self) -> grpc.ServerCredentials | None:
        if not self.enabled:
            return None
        if not (self.cert and self.key):
            raise TLSConfigError("a server needs both --tls-cert and --tls-key (a client CA alone cannot serve TLS)")
        pair = (_read(self.key, "private key"), _read(self.cert, "certificate"))
        ca = _read(self.client_ca, "client CA bundle") if self.client_ca else None
        # require_client_auth: a client without a certificate from this CA is refused in the handshake.
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


@dataclass(frozen=True)
class ClientTLS:
    """A gRPC client's side: `ca` verifies the server, `cert`/`key` are presented to it."""

    ca: str = ""
    cert: str = ""
    key: str = ""
    # The name the server's certificate must carry, when it differs from the host
    # dialled (an IP address, or a Service name the certificate does not list).
    server_name: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.ca or self.cert or self.key)

    @property
    def mode(self) -> str:
        if not self.enabled:
            return "plaintext"
        return "mtls" if self.cert else "tls"

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.enabled:
            return None
        if bool(self.cert) != bool(self.key):
            raise TLSConfigError("a client certificate needs its key and the key its certificate")
        return grpc.ssl_channel_credentials(
            # No CA: the system roots verify the server.
            root_certificates=_read(self.ca, "CA bundle") if self.ca else None,
            private_key=_read(self.key, "private key") if self.key else None,
            certificate_chain=_read(self.cert, "certificate") if self.cert else None,
        )

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.enabled and self.server_name else []


def add_port(server, address: str, tls: ServerTLS, service: str) -> int:
    """Listen on `address` with TLS when configured; logs which, returns the port (0 = failed)."""
    creds = tls.credentials()
    if creds is None:
        port = server.add_insecure_port(address)
        log.warning("%s serves PLAINTEXT gRPC on %s: no --tls-cert configured", service, address)
    else:
        port = server.add_secure_port(address, creds)
        what = "mutual TLS (client certificates required)" if tls.mode == "mtls" else "TLS"
        log.info("%s serves gRPC over %s on %s", service, what, address)
    return port


def describe_client(tls: ClientTLS, peer: str) -> str:
    if not tls.enabled:
        return f"calls to {peer} are PLAINTEXT: no CA configured"
    return f"calls to {peer} use {'mutual TLS' if tls.mode == 'mtls' else 'TLS'}"


def aio_channel(target: str, tls: ClientTLS, options: Sequence[tuple[str, object]] = (), interceptors=None) -> grpc.aio.Channel:
    creds = tls.credentials()
    opts = list(options) + tls.options()
    if creds is None:
        return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)
    return grpc.aio.secure_channel(target, creds, options=opts, interceptors=interceptors)


def channel(target: str, tls: ClientTLS, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """The blocking-API twin of `aio_channel` (CLI commands, tests, tools)."""
    creds = tls.credentials()
    opts = list(options) + tls.options()
    if creds is None:
        return grpc.insecure_channel(target, options=opts)
    return grpc.secure_channel(target, creds, options=opts)
