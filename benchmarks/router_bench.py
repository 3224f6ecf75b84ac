"""`make bench-router`: what the router itself costs per step.

Two zero-latency sim workers (--parallel 256: every session in flight decodes in
one batch, none queues at the worker), a private Redis and one router process; a
client keeps N ReasonStream sessions in flight (N = 1, 16, 64, 256), each session
6 steps of 8 tokens, the </think> step and a 4-token answer, steps 1 and 3 hard,
policy glimpse (fused).

Per level: the router process's CPU time (user + system, all its threads) over
the steps it streamed; Redis commands per step (INFO commandstats, the commands a
script runs included) and Redis round trips per step (the router's own count: a
round trip carries the script calls that piled up); gRPC messages per step on the
router's streams (to clients; to and from the workers' Multiplex streams); the
router's overhead per step as each step reports it (wall time minus the time it
waited for workers: policy, bookkeeping, the Redis write and event-loop waits).

The 64-session level (issue 13's goal: <= 1.0 ms per step) runs `--repeat` times
(3) and the table shows the median run: on the machine's shared cores one run
moves by +-15%.

Then, at 64 sessions, the same with sessions of 30 steps: the two runs give the
CPU (and Redis commands) per session (set-up, answer, Started/Done) and per
additional step, so the figure does not depend on how long the bench's sessions
are. And both shapes once more after a prompt of ~2200 tokens: what a long
prefix costs each additional step (a worker call sends what the session added, not its
prefix: services/worker/prompt_delta.py).

`--profile DIR` records the router with py-spy during each level and prints its
top costs (a profiled run's CPU figures are not comparable). `--pin` puts the
router on core 0 alone and everything else on the other cores, as if on nodes of
their own.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import urllib.request
from pathlib import Path

import grpc
import redis

from benchmarks import profile
from benchmarks.report import write_section
from glimprouter.v1 import router_pb2 as pb
from glimprouter.v1 import router_pb2_grpc
from services.common import procs, redis_local

LEVELS = (1, 16, 64, 256)
COMMAND = "make bench-router"
LONG = 30  # steps of the long sessions (before the </think> step)
GOAL_LEVEL = 64  # issue 13: router CPU per step <= 1.0 ms at 64 concurrent sessions
ROUTER_CORE = {0}  # --pin: the router's core; everything else runs on the others
OTHERS = set(range(1, os.cpu_count() or 2))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def command_counts(r: redis.Redis) -> dict[str, int]:
    return {k: v["calls"] for k, v in r.info("commandstats").items()}


def router_metrics(port: int) -> dict[str, float]:
    """The router's Prometheus samples (name{labels} -> value)."""
    out = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


QUESTION = "What is 2 + 3?"
FILLER = " Some context that the question comes with, as a long prompt carries it."


def prompt_text(words: int) -> str:
    """The question, after about `words` words of context (a long session's prefix)."""
    n = -(-words // len(FILLER.split())) if words else 0
    return (FILLER * n).strip() + "\n\n" + QUESTION if n else QUESTION


async def one_session(stub, overheads: list[float], policy: str, prompt: str, prompt_tokens: list[int]) -> int:
    steps = 0
    req = pb.ReasonRequest(prompt=prompt, routing=pb.RoutingOptions(policy=policy))
    async for batch in stub.ReasonStream(req, timeout=300):
        for ev in batch.events:  # the events that piled up at the router since its last message
            if ev.HasField("step"):
                overheads.append((ev.step.latency_ms - ev.step.worker_ms) * 1000.0)
                steps += 1
            elif ev.HasField("done"):
                prompt_tokens.append(ev.done.stats.prompt_tokens)
    return steps


async def bare_rpc_us(address: str, n: int = 500) -> float:
    """Client CPU of the cheapest unary call: the floor under every gRPC call."""
    from glimprouter.v1 import worker_pb2, worker_pb2_grpc

    async with grpc.aio.insecure_channel(address) as ch:
        stub = worker_pb2_grpc.ModelWorkerStub(ch)
        for _ in range(50):
            await stub.GetModelInfo(worker_pb2.GetModelInfoRequest())
        t0 = time.process_time()
        for _ in range(n):
            await stub.GetModelInfo(worker_pb2.GetModelInfoRequest())
        return (time.process_time() - t0) / n * 1e6


async def run_level(address: str, concurrency: int, sessions: int, policy: str, prompt: str = QUESTION) -> dict:
    overheads: list[float] = []
    prompt_tokens: list[int] = []
    async with grpc.aio.insecure_channel(address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        queue = list(range(sessions))
        total = 0

        async def client() -> None:
            nonlocal total
            while queue:
                queue.pop()
                steps = await one_session(stub, overheads, policy, prompt, prompt_tokens)
                total += steps  # (not `total += await ...`: that reads `total` before the await)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"steps": total, "wall": wall, "overheads": overheads,
            "prompt_tokens": statistics.median(prompt_tokens) if prompt_tokens else 0}


class Bench:
    """A private Redis, two sim workers and a router, for one session shape."""

    def __init__(self, steps: int, router_args: list[str], pin: bool = False) -> None:
        self.pin = pin  # the router on a core of its own (its own node); everything else on the others
        self.rs = redis_local.start_private()
        self.r = redis.Redis(port=self.rs.port)
        self.services: list[procs.Service] = []
        if pin:
            os.sched_setaffinity(self.rs.pid, OTHERS)
        try:
            sim = ["services.worker", "--backend", "sim", "--model", "sim", "--port", "0", "--sim-hard-steps", "1,3",
                   "--sim-steps", str(steps), "--parallel", "256"]
            self.small = self._start("worker", sim + ["--model-id", "sim-small"])
            self.large = self._start("worker", sim + ["--model-id", "sim-large"])
            self.router = self._start("router", [
                "services.router", "--port", "0", "--small", self.small.address, "--large", self.large.address,
                "--redis-url", self.rs.url, "--key-prefix", "bench:", "--max-concurrent", "1024", "--metrics-port", "0",
                *router_args])
        except BaseException:
            self.close()
            raise
        self.metrics_port = int(self.router.ready_fields["metrics_port"])

    def _start(self, name: str, argv: list[str]) -> procs.Service:
        cores = ROUTER_CORE if name == "router" else OTHERS
        svc = procs.start(name, argv, timeout=60, prefix=("taskset", "-c", ",".join(map(str, sorted(cores)))) if self.pin else ())
        self.services.append(svc)
        return svc

    def measure(self, n: int, sessions: int, policy: str, profile_dir: str | None = None, native: bool = False,
                prompt: str = QUESTION) -> dict:
        asyncio.run(run_level(self.router.address, min(n, 8), 8, policy, prompt))  # warm up connections and caches
        rec = profile.Recording(self.router.proc.pid, Path(profile_dir) / f"router-{n}.txt", native=native) if profile_dir else None
        pid = self.router.proc.pid
        c0, cpu0, m0 = command_counts(self.r), cpu_seconds(pid), router_metrics(self.metrics_port)
        res = asyncio.run(run_level(self.router.address, n, sessions, policy, prompt))
        c1, cpu1, m1 = command_counts(self.r), cpu_seconds(pid), router_metrics(self.metrics_port)
        row: dict = {}
        if rec is not None:
            row["profile"] = profile.top(rec.stop())
        steps = res["steps"]
        cmds = {k: c1.get(k, 0) - c0.get(k, 0) for k in c1}
        dm = {k: m1.get(k, 0) - m0.get(k, 0) for k in m1}

        def msgs(stream: str, direction: str) -> float:
            return dm.get(f'glimprouter_router_grpc_messages_total{{direction="{direction}",stream="{stream}"}}', 0) / steps

        ov = res["overheads"]
        row.update({
            "n": n, "sessions": sessions, "steps": steps, "cpu_s": cpu1 - cpu0, "prompt_tokens": res["prompt_tokens"],
            "cmds_n": sum(v for k, v in cmds.items() if k != "cmdstat_info"),
            "p50": pct(ov, 0.5), "p99": pct(ov, 0.99), "mean": statistics.fmean(ov),
            "sps": steps / res["wall"], "cpu_us": (cpu1 - cpu0) / steps * 1e6,
            "cmds": sum(v for k, v in cmds.items() if k != "cmdstat_info") / steps,
            "scripts": sum(v for k, v in cmds.items() if k in ("cmdstat_evalsha", "cmdstat_eval")) / steps,
            "trips": dm.get("glimprouter_router_redis_round_trips_total", 0) / steps,
            "to_client": msgs("reason", "sent"), "to_workers": msgs("multiplex", "sent"),
            "from_workers": msgs("multiplex", "received"),
        })
        return row

    def close(self) -> None:
        for svc in reversed(self.services):
            svc.stop()
        self.rs.stop()


def line(row: dict) -> str:
    return (f"{row['n']:>4} sessions: router CPU {row['cpu_us']:.0f} us/step, overhead p50 {row['p50']:.0f} us "
            f"p99 {row['p99']:.0f} us, {row['sps']:.0f} steps/s, redis {row['cmds']:.1f} cmds/step "
            f"({row['scripts']:.2f} script calls, {row['trips']:.2f} round trips), grpc messages/step: "
            f"to clients {row['to_client']:.2f}, to workers {row['to_workers']:.2f}, from workers {row['from_workers']:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)))
    ap.add_argument("--sessions-per-client", type=int, default=4, help="sessions each concurrent client runs (at least 64 per level)")
    ap.add_argument("--policy", default="glimpse")
    ap.add_argument("--repeat", type=int, default=3, help=f"runs at {GOAL_LEVEL} sessions; the table shows the median")
    ap.add_argument("--split-at", type=int, default=64,
                    help="concurrency at which sessions of 30 steps are also run, to split CPU per step from CPU per session (0: skip)")
    ap.add_argument("--long-prompt-words", type=int, default=500,
                    help="with --split-at: the same sessions after a prompt of about this many words of context")
    ap.add_argument("--pin", action="store_true",
                    help="the router on core 0 alone, the clients, workers and Redis on the other cores (as on separate nodes)")
    ap.add_argument("--router-args", default="", help="extra router flags, e.g. \"--stream-interval-ms 0\"")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--profile", metavar="DIR", help="record the router with py-spy during each level (raw stacks in DIR) "
                    "and print its top costs; the CPU figures of a profiled run are not comparable")
    ap.add_argument("--native", action="store_true", help="with --profile: C frames too (pauses the router while sampling)")
    args = ap.parse_args()
    if args.pin:
        os.sched_setaffinity(0, OTHERS)  # this process is the clients
    levels = [int(x) for x in args.levels.split(",")]
    router_args = args.router_args.split()

    bench = Bench(6, router_args, args.pin)
    rows = []
    try:
        baseline = asyncio.run(bare_rpc_us(bench.small.address))
        print(f"a bare unary gRPC call (GetModelInfo) from Python: {baseline:.0f} us of client CPU", flush=True)
        for n in levels:
            # The goal's level, measured `--repeat` times, reports its median run: the
            # machine's other load moves one run by +-15%.
            runs = [bench.measure(n, max(64, n * args.sessions_per_client), args.policy, args.profile, args.native)
                    for _ in range(args.repeat if n == GOAL_LEVEL and not args.profile else 1)]
            for r in runs:
                print(line(r), flush=True)
            rows.append(sorted(runs, key=lambda r: r["cpu_us"])[len(runs) // 2])
            rows[-1]["runs"] = [r["cpu_us"] for r in runs]
            if "profile" in rows[-1]:
                top = rows[-1]["profile"]
                print(f"py-spy, {n} sessions ({top['samples']} samples):\n{profile.table(top)}", flush=True)
    finally:
        bench.close()
    split = None
    if args.split_at:
        short = next((r for r in rows if r["n"] == args.split_at), None)
        if short is None:
            short = measure_once(6, router_args, args.split_at, args.split_at * args.sessions_per_client, args.policy, pin=args.pin)
        long_row = measure_once(LONG, router_args, args.split_at, args.split_at * 2, args.policy, pin=args.pin)
        print(f"sessions of {LONG + 1} steps: " + line(long_row), flush=True)
        # The prompt's length must not matter to a step: what a call sends grows with the
        # step, not the session. The same two shapes after a long prompt.
        long_prompt = prompt_text(args.long_prompt_words)
        wide = measure_once(6, router_args, args.split_at, args.split_at * args.sessions_per_client, args.policy,
                            long_prompt, args.pin)
        print(f"a {wide['prompt_tokens']:.0f}-token prompt: " + line(wide), flush=True)
        wide_long = measure_once(LONG, router_args, args.split_at, args.split_at * 2, args.policy, long_prompt, args.pin)
        print(f"a {wide['prompt_tokens']:.0f}-token prompt, sessions of {LONG + 1} steps: " + line(wide_long), flush=True)
        # CPU (and Redis commands) = per_session * sessions + per_step * steps, from the two shapes.
        cpu_step, cpu_session = per_step_and_session(short, long_row, "cpu_s")
        cmd_step, cmd_session = per_step_and_session(short, long_row, "cmds_n")
        wide_step, wide_session = per_step_and_session(wide, wide_long, "cpu_s")
        split = {"long": long_row, "wide": wide, "short": short, "per_step_us": cpu_step * 1e6,
                 "per_session_us": cpu_session * 1e6, "cmds_per_step": cmd_step, "cmds_per_session": cmd_session,
                 "wide_step_us": wide_step * 1e6, "wide_session_us": wide_session * 1e6}
        print(f"at {args.split_at} sessions: {split['per_step_us']:.0f} us of router CPU per step, "
              f"{split['per_session_us']:.0f} us per session; Redis commands {cmd_step:.1f} per step, "
              f"{cmd_session:.1f} per session", flush=True)

    body = report(rows, split, baseline, args)
    if args.no_write:
        print(body)
    else:
        print(f"wrote {write_section('router', body)}")
    return 0


def measure_once(steps: int, router_args: list[str], n: int, sessions: int, policy: str, prompt: str = QUESTION,
                 pin: bool = False) -> dict:
    bench = Bench(steps, router_args, pin)
    try:
        return bench.measure(n, max(64, sessions), policy, prompt=prompt)
    finally:
        bench.close()


def per_step_and_session(a: dict, b: dict, key: str) -> tuple[float, float]:
    """`key` = per_session * sessions + per_step * steps, solved from two session shapes."""
    det = a["sessions"] * b["steps"] - b["sessions"] * a["steps"]
    per_step = (a["sessions"] * b[key] - b["sessions"] * a[key]) / det
    return per_step, (a[key] - per_step * a["steps"]) / a["sessions"]


def report(rows: list[dict], split: dict | None, baseline: float, args) -> str:
    table = ["| concurrent sessions | steps | router CPU (µs/step) | overhead p50 (µs) | overhead p99 (µs) | steps/s "
             "| Redis commands/step | Redis round trips/step | gRPC msgs/step to clients | to workers | from workers |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['n']} | {r['steps']} | {r['cpu_us']:.0f} | {r['p50']:.0f} | {r['p99']:.0f} | {r['sps']:.0f} | "
                     f"{r['cmds']:.1f} | {r['trips']:.2f} | {r['to_client']:.2f} | {r['to_workers']:.2f} | {r['from_workers']:.2f} |")
    extra = " " + args.router_args if args.router_args else ""
    goal = ""
    at64 = next((r for r in rows if r["n"] == GOAL_LEVEL), None)
    if at64 is not None:
        met = "met" if at64["cpu_us"] <= 1000 else "not met"
        runs = ", ".join(f"{x / 1000:.2f}" for x in at64.get("runs", []))
        goal = (f"The goal, router CPU per step <= 1.0 ms at {GOAL_LEVEL} sessions, is {met} at this shape "
                f"({at64['cpu_us'] / 1000:.2f} ms, the median of runs at {runs} ms)")
        if split is not None:
            goal += (f"; per additional step it is {split['per_step_us'] / 1000:.2f} ms, with "
                     f"{split['per_session_us'] / 1000:.2f} ms per session on top")
        goal += "."
    split_text = ""
    if split is not None:
        lr, wide, short = split["long"], split["wide"], split["short"]
        split_text = f"""
Per step and per session, at {args.split_at} sessions: the same with sessions of {LONG + 1} steps
({lr['cpu_us']:.0f} µs/step, {lr['to_client']:.2f} messages to clients per step) against
{short['cpu_us']:.0f} µs/step at {short['steps'] // short['sessions']} steps gives **{split['per_step_us']:.0f} µs of router CPU per additional step and
{split['per_session_us']:.0f} µs per session** (the call itself, its set-up in Redis and on the workers,
Started, the answer and Done); Redis commands: **{split['cmds_per_step']:.1f} per additional step**
(the step's write, and the lease renewals, which go by time) and {split['cmds_per_session']:.1f} per session (creating it, the answer, the turn's end).

Length of the session: the same two shapes after a prompt of {wide['prompt_tokens']:.0f} tokens instead of
{short['prompt_tokens']:.0f} give **{split['wide_step_us']:.0f} µs per additional step
({split['wide_step_us'] / split['per_step_us']:.2f}x the short prompt's)** and {split['wide_session_us']:.0f} µs per
session (rendering, storing and sending the prompt once: {wide['cpu_us']:.0f} µs/step at 7 steps). A worker
call sends what the session added since its previous call on the stream, not the session's
prefix (a prompt delta: docs/router.md). The sim workers run slower on a long prompt, so fewer
steps share each message to clients ({wide['to_client']:.2f} per step at 7 steps).
"""
    return f"""## Router

`{COMMAND}` (`python -m benchmarks.router_bench{extra}`): one router process, two zero-latency
`sim` workers (`--parallel 256`), a private Redis, policy `{args.policy}` in fused mode; a client keeps
N ReasonStream sessions in flight, each 6 steps of 8 tokens, the `</think>` step and a 4-token answer,
steps 1 and 3 hard. Router CPU is the router process's user+system time (all threads) over the steps
it streamed. Redis commands count what the scripts run too; a round trip carries every script call
that piled up while the previous one was in flight. gRPC messages are the router's own count
(`glimprouter_router_grpc_messages_total`): to clients on ReasonStream, and on the workers'
Multiplex streams. Overhead per step = the step's wall time at the router minus the time it
waited for workers (queueing for a core included).

{chr(10).join(table)}
{split_text}
{goal} All processes (client, router, two workers, Redis) share the machine's 2 cores with
whatever else runs, so the overhead columns include waiting for a core. For scale: a bare unary
gRPC call (GetModelInfo) costs {baseline:.0f} µs of client CPU in grpcio's Python client here,
and a streamed message 100-800 µs (the more, the longer its stream was idle: grpcio's poller
thread wakes), which is why the router batches what it sends.
"""


if __name__ == "__main__":
    raise SystemExit(main())
