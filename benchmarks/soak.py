"""`make soak`: hundreds of concurrent sessions for minutes, through the real
router and Redis, on sim workers; bounded in time and count, loopback only.

What it reports (and writes into docs/benchmarks.md, section "Soak"):
- sessions completed, and errors by gRPC status code;
- router overhead per step, p50/p99 (the router's wall time for a step minus the
  time it awaited worker calls, as the router benchmark measures it);
- memory (RSS) of every process (Redis, router, each worker) at the start, at the
  end, and its peak, sampled every few seconds, and Redis's own used_memory;
- that every stored session's prefix is its prompt followed by exactly the token
  ids of its steps as the client received them, in order, each once.

Each client loops: a new session (about one in four continues its previous one
with a second turn instead), read to the end. Sessions use `answer_by: none`, so
a session's prefix is exactly its prompt and its steps.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import statistics
import threading
import time

import grpc
import redis

from benchmarks.report import write_section
from glimprouter.v1 import router_pb2 as pb
from glimprouter.v1 import router_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common import procs, redis_local

COMMAND = "make soak"
PROMPTS = [f"Question {i}: a shop sells {i + 3} boxes of {2 * i + 5} apples. How many apples?" for i in range(16)]


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


async def _events(stream):
    async for batch in stream:  # the events that piled up at the router since its last message
        for ev in batch.events:
            yield ev


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


class Sampler(threading.Thread):
    """RSS of each process every `every` seconds: start, peak, end."""

    def __init__(self, pids: dict[str, int], every: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.pids, self.every = pids, every
        self.samples: dict[str, list[float]] = {name: [rss_mb(pid)] for name, pid in pids.items()}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            for name, pid in self.pids.items():
                self.samples[name].append(rss_mb(pid))

    def finish(self, warm_s: float = 30.0) -> dict[str, tuple[float, float, float, float]]:
        """(start, after `warm_s` of load, peak, end) per process: flat means end ~ warm."""
        self.stop.set()
        self.join()
        for name, pid in self.pids.items():
            self.samples[name].append(rss_mb(pid))
        warm = min(int(warm_s / self.every), 0x7FFFFFFF)
        return {name: (xs[0], xs[min(warm, len(xs) - 1)], max(xs), xs[-1]) for name, xs in self.samples.items()}


class Soak:
    def __init__(self, address: str, concurrency: int, duration_s: float, max_sessions: int, timeout_s: float) -> None:
        self.address, self.concurrency, self.duration_s = address, concurrency, duration_s
        self.max_sessions, self.timeout_s = max_sessions, timeout_s
        self.started = 0
        self.completed = 0
        self.turns = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.overheads_us: list[float] = []
        self.steps = 0
        # session id -> (prompt, {step index: token ids as streamed})
        self.sessions: dict[str, tuple[str, dict[int, list[int]]]] = {}

    async def one_turn(self, stub, session_id: str, rng: random.Random) -> str:
        if session_id:
            req = pb.ReasonRequest(session_id=session_id, prompt="And twice as many?", include_token_ids=True,
                                   answer_by=pb.ANSWER_BY_NONE)
        else:
            prompt = rng.choice(PROMPTS)
            req = pb.ReasonRequest(prompt=prompt, include_token_ids=True, answer_by=pb.ANSWER_BY_NONE)
            self.started += 1
        sid = session_id
        try:
            async for ev in _events(stub.ReasonStream(req, timeout=self.timeout_s)):
                if ev.HasField("started"):
                    sid = ev.started.session_id
                    if not session_id:
                        self.sessions[sid] = (req.prompt, {})
                elif ev.HasField("step"):
                    s = ev.step
                    self.sessions[sid][1][s.index] = list(s.token_ids)
                    self.overheads_us.append((s.latency_ms - s.worker_ms) * 1000.0)
                    self.steps += 1
                elif ev.HasField("done"):
                    if session_id:
                        self.turns += 1
                    else:
                        self.completed += 1
        except grpc.aio.AioRpcError as exc:
            self.errors[exc.code().name] += 1
            return ""
        return sid

    async def run(self) -> float:
        end = time.monotonic() + self.duration_s
        async with grpc.aio.insecure_channel(self.address) as ch:
            stub = router_pb2_grpc.RouterStub(ch)

            async def client(seed: int) -> None:
                rng = random.Random(seed)
                last = ""
                while time.monotonic() < end and self.started < self.max_sessions:
                    # About one in four: a second turn on the session just finished.
                    last = await self.one_turn(stub, last if last and rng.random() < 0.25 else "", rng)

            t0 = time.perf_counter()
            await asyncio.gather(*(client(i) for i in range(self.concurrency)))
            return time.perf_counter() - t0

    async def verify(self, worker_address: str) -> tuple[int, list[str]]:
        """Every stored session's prefix against its prompt and its streamed steps."""
        problems: list[str] = []
        rendered: dict[str, list[int]] = {}
        async with grpc.aio.insecure_channel(worker_address) as wch, grpc.aio.insecure_channel(self.address) as rch:
            worker = worker_pb2_grpc.ModelWorkerStub(wch)
            router = router_pb2_grpc.RouterStub(rch)
            for text in PROMPTS:
                r = await worker.RenderPrompt(worker_pb2.RenderPromptRequest(
                    messages=[worker_pb2.ChatMessage(role="user", content=text)], add_generation_prompt=True))
                rendered[text] = list(r.token_ids)
            checked = 0
            for sid, (prompt, streamed) in self.sessions.items():
                s = await router.GetSession(pb.GetSessionRequest(session_id=sid, include_prefix=True), timeout=30)
                checked += 1
                prefix = list(s.prefixes[0].token_ids)
                indices = [x.index for x in s.steps]
                if indices != list(range(len(indices))):
                    problems.append(f"{sid}: step indices {indices}")
                    continue
                if s.turn == 0:
                    expected = rendered[prompt] + [t for i in indices for t in streamed.get(i, [])]
                    missing = [i for i in indices if i not in streamed]
                    if missing:  # stored but not streamed: only possible when the stream failed after the write
                        problems.append(f"{sid}: steps {missing} stored but never received")
                    elif prefix != expected:
                        problems.append(f"{sid}: prefix ({len(prefix)} tokens) != prompt + steps ({len(expected)})")
                else:
                    # Two turns: the prompt, turn 0's steps, the turn's rendered messages, turn 1's
                    # steps. The step tokens must sit in the prefix in order at their recorded lengths.
                    body = sum(x.tokens for x in s.steps)
                    if len(prefix) < len(rendered[prompt]) + body or prefix[: len(rendered[prompt])] != rendered[prompt]:
                        problems.append(f"{sid}: two-turn prefix does not start with its prompt")
                    if any(len(streamed.get(x.index, [])) != x.tokens for x in s.steps if x.index in streamed):
                        problems.append(f"{sid}: a step's stored token count differs from what was streamed")
        return checked, problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=256, help="sessions in flight at once")
    ap.add_argument("--duration-s", type=float, default=180.0, help="how long new sessions are started")
    ap.add_argument("--max-sessions", type=int, default=50000, help="stop starting sessions after this many")
    ap.add_argument("--timeout-s", type=float, default=120.0, help="deadline of one request")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()

    try:
        rs = redis_local.start_private()
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    services: list[procs.Service] = []
    try:
        r = redis.Redis(port=rs.port)
        sim = ["services.worker", "--backend", "sim", "--model", "sim", "--port", "0", "--sim-hard-steps", "1,3",
               "--metrics-port", "-1"]
        small = procs.start("worker", sim + ["--model-id", "sim-small"], timeout=60)
        large = procs.start("worker", sim + ["--model-id", "sim-large"], timeout=60)
        services += [small, large]
        router = procs.start("router", [
            "services.router", "--port", "0", "--small", small.address, "--large", large.address,
            "--redis-url", rs.url, "--key-prefix", "soak:", "--max-concurrent", "1024",
            "--max-sessions", "100000"], timeout=60)
        services.append(router)
        redis_mem0 = r.info("memory")["used_memory"] / 2**20
        sampler = Sampler({"redis": rs.pid, "router": router.proc.pid, "small worker": small.proc.pid,
                           "large worker": large.proc.pid, "soak client": os.getpid()})
        sampler.start()
        soak = Soak(router.address, args.concurrency, args.duration_s, args.max_sessions, args.timeout_s)
        print(f"soak: {args.concurrency} concurrent sessions for {args.duration_s:.0f}s ...", flush=True)
        wall = asyncio.run(soak.run())
        memory = sampler.finish()
        redis_mem1 = r.info("memory")["used_memory"] / 2**20
        stored = sum(1 for _ in r.scan_iter("soak:*:meta", count=1000))
        print(f"soak: {soak.completed} sessions + {soak.turns} second turns in {wall:.0f}s; verifying ...", flush=True)
        checked, problems = asyncio.run(soak.verify(small.address))
        alive = {svc.name: svc.proc.poll() is None for svc in services}
    finally:
        for svc in reversed(services):
            svc.stop()
        rs.stop()

    ov = soak.overheads_us
    errors = ", ".join(f"{k} {v}" for k, v in sorted(soak.errors.items())) or "none"
    mem_rows = "\n".join(f"| {name} | {a:.0f} | {w:.0f} | {p:.0f} | {b:.0f} |" for name, (a, w, p, b) in memory.items())
    ok = not problems and all(alive.values())
    summary = (f"sessions started {soak.started}, completed {soak.completed} (+{soak.turns} second turns), "
               f"errors: {errors}; steps {soak.steps} ({soak.steps / wall:.0f}/s); overhead p50 {pct(ov, 0.5) / 1000:.2f} ms, "
               f"p99 {pct(ov, 0.99) / 1000:.2f} ms; prefixes checked {checked}, mismatches {len(problems)}")
    print(summary)
    for p in problems[:20]:
        print("  mismatch:", p)
    body = f"""## Soak

`{COMMAND}` (`python -m benchmarks.soak --concurrency {args.concurrency} --duration-s {args.duration_s:.0f}`):
{args.concurrency} clients each run sessions back to back for {args.duration_s:.0f} s (about one in four
continues its previous session with a second turn) through one router process, a private
Redis and two zero-latency `sim` workers (6 steps of 8 tokens plus the `</think>` step,
steps 1 and 3 hard, glimpse policy, `answer_by: none`), all on loopback and on the
machine's 2 cores.

| | |
|---|---|
| sessions started / completed | {soak.started} / {soak.completed} (+{soak.turns} second turns) |
| errors by code | {errors} |
| steps | {soak.steps} ({soak.steps / wall:.0f} per second over {wall:.0f} s) |
| router overhead per step | p50 {pct(ov, 0.5) / 1000:.2f} ms, p99 {pct(ov, 0.99) / 1000:.2f} ms, mean {statistics.fmean(ov) / 1000 if ov else float('nan'):.2f} ms |
| sessions stored in Redis at the end | {stored} |
| stored prefixes checked against the streamed steps | {checked}, mismatches: {len(problems)} |
| Redis used_memory | {redis_mem0:.1f} MiB at the start, {redis_mem1:.1f} MiB at the end (the sessions themselves, kept for their 1 h TTL) |

Memory (RSS, MiB; sampled every 5 s; "loaded" is 30 s into the run, once every buffer
and connection pool has grown to the load):

| process | start (idle) | loaded | peak | end |
|---|---:|---:|---:|---:|
{mem_rows}

The overhead here includes waiting for a core: {args.concurrency} sessions, the router, both
workers, Redis and the client share 2 cores, so it is far above the router benchmark's
low-concurrency figures. Every process was {"still running at the end" if all(alive.values()) else "NOT all running at the end: " + str(alive)}.
"""
    if not args.no_write:
        print(f"wrote {write_section('soak', body)}")
    else:
        print(body)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
