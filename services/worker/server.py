"""The worker process: gRPC server with health, reflection and graceful shutdown.

Readiness ("" and the ModelWorker service name on grpc.health.v1) is NOT_SERVING
until the model is loaded and warm, so Kubernetes sends no traffic to a cold
worker; the "liveness" service name is SERVING as soon as the process answers.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from glimprouter.v1 import worker_pb2, worker_pb2_grpc
from services.common import grpc_input, telemetry, tls
from services.worker import observe
from services.worker.config import WorkerSettings
from services.worker.engine import Engine
from services.worker.servicer import WorkerServicer

log = logging.getLogger("glimprouter.worker")

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["ModelWorker"].full_name
LIVENESS = "liveness"


class WorkerServer:
    def __init__(self, settings: WorkerSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
            ]
        )
        self.servicer = WorkerServicer(engine)
        grpc_input.add_servicer(worker_pb2_grpc.add_ModelWorkerServicer_to_server, self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        self.port = 0

    async def start(self) -> int:
        s = self.settings
        self.port = tls.add_port(self.server, f"{s.host}:{s.port}", tls.ServerTLS(s.tls_cert, s.tls_key, s.tls_client_ca), "worker")
        if self.port == 0:
            raise RuntimeError(f"could not listen on {self.settings.host}:{self.settings.port}")
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self.server.start()
        await self.engine.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        observe.READY.labels(self.engine.info.model_id).set(1)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        # Readiness goes first so load balancers stop sending while steps in flight
        # finish; health keeps answering (NOT_SERVING) until they have, new calls get
        # UNAVAILABLE (routers retry them on another replica), then the server stops.
        grace = self.settings.shutdown_grace_s if grace is None else grace
        end = time.monotonic() + grace
        await self.health.enter_graceful_shutdown()
        observe.READY.labels(self.engine.info.model_id).set(0)
        self.servicer.draining = True
        while self.servicer.in_flight and time.monotonic() < end:
            await asyncio.sleep(0.05)
        if self.servicer.in_flight:
            log.warning("%d call(s) still running after %.0fs: cancelling them", self.servicer.in_flight, grace)
        await self.server.stop(max(0.0, end - time.monotonic()))
        await self.engine.close()
        telemetry.shutdown()


async def serve(settings: WorkerSettings, engine: Engine) -> None:
    telemetry.setup("glimprouter-worker")  # before the server exists: it patches grpc.aio.server
    metrics_port = telemetry.start_metrics_server(settings.metrics_port, settings.host)
    server = WorkerServer(settings, engine)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    port = await server.start()
    info = engine.info
    # Parents (the CLI, tests) read this line to learn the port when --port 0.
    # The engine's own words (threads, parallel sequences, batch size) follow.
    print(
        f"glimprouter-worker ready model={info.model_id} backend={info.backend} port={port} metrics_port={metrics_port}"
        f" {engine.describe()}".rstrip(),
        flush=True,
    )
    await stopping.wait()
    log.info("shutting down: draining for up to %.0fs", settings.shutdown_grace_s)
    await server.stop()
