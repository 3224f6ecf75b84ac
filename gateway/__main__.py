"""`glimprouter-gateway`: the OpenAI-compatible HTTP front door to the router."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys

import uvicorn

from gateway.config import GatewaySettings
from services.common import settings as settings_mod

log = logging.getLogger("glimprouter.gateway")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, which would
        # make a clean stop look like a crash (exit -15) to `glimprouter up`.
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def _serve(s: GatewaySettings) -> None:
    from gateway.app import create_app

    try:
        sock = _bind(s.host, s.port)
    except OSError as exc:
        raise SystemExit(f"glimprouter-gateway: cannot listen on {s.host}:{s.port}: {exc.strerror}") from None
    port = sock.getsockname()[1]
    if bool(s.tls_cert) != bool(s.tls_key):
        raise SystemExit("glimprouter-gateway: --tls-cert and --tls-key go together")
    if s.tls_cert:
        log.info("serving HTTPS on %s:%d", s.host, port)
    else:
        log.warning("serving PLAINTEXT HTTP on %s:%d: no --tls-cert configured (terminate TLS in front of it)", s.host, port)
    config = uvicorn.Config(
        create_app(s),
        log_level=s.log_level,
        access_log=False,  # the metrics count requests; access lines would only repeat them
        timeout_graceful_shutdown=s.shutdown_grace_s,
        lifespan="on",
        ssl_certfile=s.tls_cert or None,
        ssl_keyfile=s.tls_key or None,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        # Parents (the CLI, tests) read this line to learn the port when --port 0.
        print(f"glimprouter-gateway ready router={s.router} port={port}", flush=True)
    await task


def main(argv: list[str] | None = None) -> int:
    s = settings_mod.load(GatewaySettings, argv, prog="glimprouter-gateway", description=__doc__)
    logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("starting with %s", settings_mod.describe(s))
    from services.common import telemetry

    telemetry.setup("glimprouter-gateway")  # before the router channel exists: it instruments gRPC channels
    try:
        asyncio.run(_serve(s))
    finally:
        telemetry.shutdown()  # the last requests' spans
    return 0


if __name__ == "__main__":
    sys.exit(main())
