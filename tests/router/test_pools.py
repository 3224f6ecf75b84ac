"""The worker pool's view of its endpoints, against in-process fake workers.

What is up is what calls, retries and the router's readiness go by: an endpoint is
up once a health check answered SERVING over its channel, and down from the moment
its channel cannot connect, a call on it fails UNAVAILABLE or a check fails. No
attempt, first or retry, goes to an endpoint that is down; a session whose home is
down moves before its first attempt; a worker that comes back is found by its
channel, not a health interval later. Each test failed on the pool before these
rules (see the comments at their asserts).
"""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from glimprouter.v1 import worker_pb2 as pb
from glimprouter.v1 import worker_pb2_grpc as pb_grpc
from services.router.errors import WorkersUnavailable
from services.router.workers import WorkerPool
from services.worker.mux import Multiplexer
from services.worker.prompt_delta import SESSIONS, Continued, Receiver

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The pool's calls travel on each endpoint's Multiplex stream; the fake answers them
# through the worker's own Multiplexer, one method per call kind (Tokenize here).
REQUEST = pb.TokenizeRequest(text="four")


class FakeWorker:
    """A ModelWorker and grpc.health.v1 server in this process whose answers the test sets:
    `status` (health), `fail` (a status code every Tokenize is aborted with), `hold` (an
    event the next health checks wait for); `calls` counts Tokenize calls."""

    def __init__(self) -> None:
        self.port = 0
        self.status = SERVING
        self.fail: grpc.StatusCode | None = None
        self.hold: asyncio.Event | None = None
        self.checked = asyncio.Event()  # a health check has arrived
        self.calls = 0
        self.prompts: list[tuple[str, list[int]]] = []  # (session, whole prompt) of each Extend
        self.kinds: list[str] = []  # how each prompt came on the stream: "token_ids" or "delta"
        self.keeps = SESSIONS  # sessions whose prompts the worker's end of a stream keeps
        self.server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> "FakeWorker":
        """Listens on a free port the first time, then on the same one (a restart)."""
        fake = self

        class Worker(pb_grpc.ModelWorkerServicer):
            async def GetModelInfo(self, request, context):
                return pb.ModelInfo(model_id="fake", backend="fake", vocab_size=10, context_length=64,
                                    tokenizer_fingerprint="fake-tokenizer")

            async def Tokenize(self, request, context):
                fake.calls += 1
                if fake.fail is not None:
                    await context.abort(fake.fail, "scripted failure")
                return pb.TokenizeResponse(token_ids=[4])

            async def Extend(self, request, context):
                fake.prompts.append((request.session_id, list(request.prompt.token_ids.ids)))
                return pb.ExtendResponse()

            async def Multiplex(self, request_iterator, context):
                mux = Multiplexer(self, request_iterator, context)
                mux.prompts = Receiver(fake.keeps)
                resolve = mux._resolve

                def noted(request) -> str:  # how each prompt came, before the stream made it whole
                    fake.kinds.append(request.prompt.WhichOneof("kind"))
                    return resolve(request)

                mux._resolve = noted
                await mux.serve()

        class Health(health_pb2_grpc.HealthServicer):
            async def Check(self, request, context):
                fake.checked.set()
                if fake.hold is not None:
                    await fake.hold.wait()
                return health_pb2.HealthCheckResponse(status=fake.status)

        self.server = grpc.aio.server()
        pb_grpc.add_ModelWorkerServicer_to_server(Worker(), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(Health(), self.server)
        port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert port, f"cannot listen on 127.0.0.1:{self.port}"
        self.port = port
        await self.server.start()
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
            self.server = None


@pytest.fixture
async def fakes():
    """Starts fake workers (`await fakes.new()`) and pools (`await fakes.pool(...)`); stops them all."""
    workers: list[FakeWorker] = []
    pools: list[WorkerPool] = []

    class Fakes:
        async def new(self) -> FakeWorker:
            workers.append(await FakeWorker().start())
            return workers[-1]

        async def pool(self, *ws: FakeWorker, **kw) -> WorkerPool:
            pools.append(WorkerPool("large", [w.address for w in ws], **kw))
            await pools[-1].start(5)
            return pools[-1]

    yield Fakes()
    for p in pools:
        await p.close()
    for w in workers:
        await w.stop()


async def until(predicate, what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.01)


def endpoint(pool: WorkerPool, w: FakeWorker):
    return next(ep for ep in pool.endpoints if ep.address == w.address)


async def test_a_retry_never_goes_to_an_endpoint_marked_down(fakes):
    home, draining = await fakes.new(), await fakes.new()
    draining.status = NOT_SERVING  # its health says so; a call sent to it would still be answered
    pool = await fakes.pool(home, draining, health_interval_s=0.05)
    await until(lambda: not endpoint(pool, draining).healthy, "the draining worker to be marked down")

    home.fail = grpc.StatusCode.UNAVAILABLE  # the session's home fails the attempt
    with pytest.raises(WorkersUnavailable, match=r"no healthy large worker \(tried .*; down: "):
        await pool.call("s1", {"large": home.address}, "Tokenize", REQUEST)
    # Before: the retry went to the endpoint marked down (and was answered there).
    assert (home.calls, draining.calls) == (1, 0)

    # Nothing up at all: refused at once, with no attempt on either.
    home.fail, home.status = None, NOT_SERVING
    await until(lambda: not any(ep.healthy for ep in pool.endpoints), "both workers to be marked down")
    with pytest.raises(WorkersUnavailable, match="no healthy large worker"):
        await pool.call("s2", {}, "Tokenize", REQUEST)
    assert (home.calls, draining.calls) == (1, 0)  # before: (2, 0), the first attempt went to a down endpoint


async def test_a_session_whose_home_is_down_moves_before_its_first_attempt(fakes):
    home, other = await fakes.new(), await fakes.new()
    # No retries, and no health check during the test: only the channel can tell that the home is gone.
    pool = await fakes.pool(home, other, retries=0, health_interval_s=60)
    await home.stop()
    gone = endpoint(pool, home)
    gone.channel.get_state(try_to_connect=True)
    await until(lambda: gone.channel.get_state() is grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                "the home's channel to fail to connect")

    affinity = {"large": home.address}
    out = await pool.call("s1", affinity, "Tokenize", REQUEST)  # before: the only attempt went to the dead home
    assert list(out.token_ids) == [4] and other.calls == 1
    assert affinity == {"large": other.address}  # the new home, where the core persists it with the step


async def test_a_worker_that_comes_back_is_up_once_its_channel_connects_and_takes_the_first_call(fakes):
    w = await fakes.new()
    pool = await fakes.pool(w, health_interval_s=60)  # a health loop far too slow to find it
    ep = pool.endpoints[0]
    await w.stop()
    with pytest.raises(WorkersUnavailable):
        await pool.call("s1", {}, "Tokenize", REQUEST)
    assert not ep.healthy

    await w.start()  # back on its old address
    # Before: it stayed down until the next health check, a minute later.
    await until(lambda: ep.healthy, "the pool to find the worker back", timeout=15)
    assert pool.serving()  # up means connected: the first call after this is served
    assert list((await pool.call("s1", {}, "Tokenize", REQUEST)).token_ids) == [4]


async def test_a_health_check_under_way_when_a_call_fails_does_not_mark_the_endpoint_up_again(fakes):
    w = await fakes.new()
    pool = await fakes.pool(w, health_interval_s=60)
    ep = pool.endpoints[0]
    w.hold, w.checked = asyncio.Event(), asyncio.Event()
    check = asyncio.create_task(pool._check(ep))  # what the health loop runs every interval
    await w.checked.wait()  # the check is under way; it will answer SERVING

    w.fail = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(WorkersUnavailable):
        await pool.call("s1", {}, "Tokenize", REQUEST)
    assert not ep.healthy

    w.hold.set()
    await check
    # Before: the SERVING sent before the failure marked the endpoint up again, and the
    # router's readiness said SERVING for a worker that had just refused a call.
    assert not ep.healthy and not pool.serving()


async def test_a_sessions_prompts_go_as_deltas_and_arrive_whole(fakes):
    w = await fakes.new()
    pool = await fakes.pool(w)
    prefix = list(range(100, 400))
    sent = []
    for step in range(4):
        prompt = Continued(prefix, [7, 7]) if step == 2 else prefix
        sent.append(list(prompt))
        await pool.extend("s1", {}, pb.ExtendRequest(session_id="s1"), prompt)
        prefix.extend([step, step + 1])  # a step stored
    assert w.prompts == [("s1", p) for p in sent]
    assert w.kinds == ["token_ids", "delta", "delta", "delta"]
    # The session's turn ended: its next call goes whole (to whichever router takes it).
    pool.forget("s1")
    await pool.extend("s1", {}, pb.ExtendRequest(session_id="s1"), prefix)
    assert w.kinds[-1] == "token_ids" and w.prompts[-1] == ("s1", prefix)


async def test_a_delta_the_worker_cannot_resolve_is_sent_again_whole(fakes):
    w = await fakes.new()
    w.keeps = 1  # the worker keeps fewer sessions than the router thinks: every delta below is refused
    pool = await fakes.pool(w)
    a, b = [1, 2, 3], [5, 6]
    for sid, prefix in (("a", a), ("b", b)):
        await pool.extend(sid, {}, pb.ExtendRequest(session_id=sid), prefix)
    a.append(4)
    await pool.extend("a", {}, pb.ExtendRequest(session_id="a"), a)
    assert w.prompts[-1] == ("a", [1, 2, 3, 4])  # the call succeeded, with the whole prompt
    assert w.kinds == ["token_ids", "token_ids", "delta", "token_ids"]  # refused, then sent whole
