"""`make bench-worker`: the CPU worker against llama.cpp itself, side by side in one run.

For each model, one worker process (llama.cpp backend, all cores, --parallel 8)
and, in this process, llama.cpp without the worker (benchmarks/raw_llama.py),
never running at the same time:
  1. decode ms/token of one 64-token request: raw `Llama.eval` per token against
     the worker seen by a gRPC client (GenerateStream, time between its first and
     last token), greedy and at T=0.6/top-p 0.95; the ratio is the worker's cost;
  2. a Glimpse with its prefix cached (all but the last token) at the client,
     against one decode step of the worker (goal: <= 1.2);
  3. N concurrent 64-token requests (N = 1, 2, 4, 8): raw llama.cpp decoding N
     sequences in one batch per token against N concurrent GenerateStream calls:
     aggregate tokens/s, per-request ms/token and time to first token.
Rounds alternate raw and worker runs; medians over the rounds.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
from dataclasses import dataclass

import grpc

from benchmarks import raw_llama
from benchmarks.report import write_section
from glimprouter.v1 import worker_pb2 as pb
from glimprouter.v1 import worker_pb2_grpc
from services.common import procs
from services.worker import models
from services.worker.backends.llamacpp import usable_cores

QUESTIONS = [
    "A baker makes 24 muffins in the morning and 18 in the afternoon. She sells 31. How many are left?",
    "A train travels 60 km in one hour. How far does it travel in three and a half hours?",
    "Tom has 3 boxes of 12 pencils and gives away 7 pencils. How many pencils does he keep?",
    "A rectangle is 8 cm long and 5 cm wide. What are its area and its perimeter?",
    "Sara reads 15 pages a day. How many days does she need for a book of 240 pages?",
    "A shirt costs 20 dollars and is sold at a 15 percent discount. What is the new price?",
    "There are 9 rows of 14 chairs in a hall and 37 are taken. How many chairs are free?",
    "A tank holds 500 litres and loses 12 litres an hour. How much is left after a day?",
]
TOKENS = 64
CONCURRENCY = (1, 2, 4, 8)
SAMPLED = pb.Sampling(temperature=0.6, top_p=0.95, seed=11, max_tokens=TOKENS)
GREEDY = pb.Sampling(max_tokens=TOKENS)
NO_STOP = pb.StopCondition(step_boundary="", stop_on_eos=False)


def ids(tokens) -> pb.Prompt:
    return pb.Prompt(token_ids=pb.TokenIds(ids=tokens))


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


@dataclass
class Stream:
    """One GenerateStream as its client saw it."""

    tokens: int
    started: float
    first: float  # arrival of the first token
    last: float  # arrival of the last token
    first_tokens: int  # tokens in the first message

    @property
    def ttft_ms(self) -> float:
        return (self.first - self.started) * 1e3

    @property
    def ms_per_token(self) -> float:
        return (self.last - self.first) * 1e3 / max(1, self.tokens - self.first_tokens)


def stream(stub, prompt: list[int], sampling: pb.Sampling, sid: str) -> Stream:
    req = pb.GenerateRequest(prompt=ids(prompt), sampling=sampling, stop=NO_STOP, session_id=sid)
    started = time.perf_counter()
    first = last = 0.0
    n = first_n = 0
    for c in stub.GenerateStream(req, timeout=600):
        if c.token_ids:
            last = time.perf_counter()
            if not n:
                first, first_n = last, len(c.token_ids)
            n += len(c.token_ids)
    return Stream(n, started, first, last, first_n)


class Worker:
    def __init__(self, path: str, threads: int) -> None:
        self.svc = procs.start(
            "worker",
            ["services.worker", "--model", path, "--port", "0", "--threads", str(threads), "--parallel", "8",
             "--context-length", "1024", "--metrics-port", "-1"],
            timeout=300,
        )
        self.channel = grpc.insecure_channel(self.svc.address)
        self.stub = worker_pb2_grpc.ModelWorkerStub(self.channel)

    def prompt(self, question: str) -> list[int]:
        msg = pb.ChatMessage(role="user", content=question + " Think step by step.")
        return list(self.stub.RenderPrompt(pb.RenderPromptRequest(messages=[msg], add_generation_prompt=True)).token_ids)

    def close(self) -> None:
        self.channel.close()
        self.svc.stop()


def concurrent(stub, prompts: list[list[int]], tag: str) -> list[Stream]:
    out: list[Stream | None] = [None] * len(prompts)

    def one(i: int) -> None:
        out[i] = stream(stub, prompts[i], GREEDY, f"{tag}-{i}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [s for s in out if s is not None]


def aggregate(streams: list[Stream]) -> float:
    """Tokens/s over all requests, from the first token of any to the last token of all."""
    span = max(s.last for s in streams) - min(s.first for s in streams)
    return sum(s.tokens - s.first_tokens for s in streams) / span


def glimpse_ms(stub, prompt: list[int], sid: str, rounds: int) -> float:
    """A Glimpse whose prefix is cached but for its last token, as after a step."""
    out = []
    prefix = list(prompt)
    for i in range(rounds):
        prefix += [prompt[-1 - (i % 5)]]  # grow the prefix a little each round
        stub.Glimpse(pb.GlimpseRequest(prompt=ids(prefix[:-1]), session_id=sid))
        t0 = time.perf_counter()
        stub.Glimpse(pb.GlimpseRequest(prompt=ids(prefix), session_id=sid))
        out.append((time.perf_counter() - t0) * 1e3)
    return median(out)


def bench_model(model: str, threads: int, rounds: int) -> dict:
    path = str(models.resolve(model))
    w = Worker(path, threads)
    try:
        prompts = [w.prompt(q) for q in QUESTIONS]
        raw = raw_llama.Single(path, threads)
        raw_ms, greedy_ms, sampled_ms = [], [], []
        try:
            for r in range(rounds):
                raw_ms.append(raw.run(prompts[0], TOKENS).ms_per_token)
                greedy_ms.append(stream(w.stub, prompts[0], GREEDY, f"one-{r}").ms_per_token)
                sampled_ms.append(stream(w.stub, prompts[0], SAMPLED, f"one-{r}").ms_per_token)
        finally:
            raw.close()
        g_ms = glimpse_ms(w.stub, prompts[1], "glimpse", 2 * rounds + 1)
        conc = []
        for n in CONCURRENCY:
            batched = raw_llama.Batched(path, threads, n)
            raw_tps, worker_tps, per_req, ttft = [], [], [], []
            try:
                for r in range(rounds):
                    raw_tps.append(batched.run(prompts[:n], TOKENS).tokens_per_s)
                    streams = concurrent(w.stub, prompts[:n], f"c{n}-{r}")
                    worker_tps.append(aggregate(streams))
                    per_req.append(median([s.ms_per_token for s in streams]))
                    ttft.append(median([s.ttft_ms for s in streams]))
            finally:
                batched.close()
            conc.append({"n": n, "raw": median(raw_tps), "worker": median(worker_tps),
                         "per_req": median(per_req), "ttft": median(ttft)})
            print(f"  {model} x{n}: {conc[-1]}", flush=True)
    finally:
        w.close()
    return {"model": model, "raw_ms": median(raw_ms), "greedy_ms": median(greedy_ms),
            "sampled_ms": median(sampled_ms), "glimpse_ms": g_ms, "conc": conc}


def report(results: list[dict], threads: int, rounds: int, command: str) -> str:
    lines = [
        "## Worker",
        "",
        f"Command: `{command}` (`make bench-worker` runs it with its defaults). One worker process per model",
        f"(llama.cpp backend, --threads {threads}, --parallel 8) over loopback gRPC and, in the benchmark's own",
        "process, llama.cpp without the worker (benchmarks/raw_llama.py): llama-cpp-python's `Llama.eval` per",
        "token for one sequence; the low-level `llama_decode` over N sequences in one batch per token for N.",
        f"Both at the same thread count, never at the same time, {rounds} alternating rounds, medians; greedy",
        f"unless said; {TOKENS}-token requests on short word problems.",
        "",
        "### One request: decode ms/token",
        "",
        "| model | raw llama.cpp | worker, greedy | ratio | worker, T=0.6 top-p 0.95 | ratio | glimpse ms (cached prefix) | glimpse / decode |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['raw_ms']:.1f} | {r['greedy_ms']:.1f} | {r['greedy_ms'] / r['raw_ms']:.2f} "
            f"| {r['sampled_ms']:.1f} | {r['sampled_ms'] / r['raw_ms']:.2f} | {r['glimpse_ms']:.1f} "
            f"| {r['glimpse_ms'] / r['greedy_ms']:.2f} |"
        )
    lines += [
        "",
        "The worker's figure is what a gRPC client sees: the time between its first and its last token over the",
        "tokens in between (GenerateStream). The glimpse is timed at the client too, round trip included, with",
        "all but the prompt's last token cached (as after a step); it is set against the worker's greedy ms/token.",
        "",
        "### Concurrent requests (continuous batching)",
        "",
        "| model | requests | raw batched tokens/s | worker tokens/s | worker / raw | worker ms/token per request | time to first token ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for c in r["conc"]:
            lines.append(
                f"| {r['model']} | {c['n']} | {c['raw']:.1f} | {c['worker']:.1f} | {c['worker'] / c['raw']:.2f} "
                f"| {c['per_req']:.1f} | {c['ttft']:.0f} |"
            )
    lines += [
        "",
        "Aggregate tokens/s: every token after each request's first, from the first token of any request to the",
        "last token of all. Raw batched: the same N prompts decoded in lockstep by one `llama_decode` per token.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen2.5-coder-0.5b,qwen2.5-coder-1.5b")
    parser.add_argument("--threads", type=int, default=0, help="0: every core this process may use")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    threads = args.threads or usable_cores()
    results = []
    for m in args.models.split(","):
        print(f"benchmarking {m} ...", flush=True)
        results.append(bench_model(m, threads, args.rounds))
        print(results[-1], flush=True)
    command = "python -m benchmarks.worker_bench" + (
        f" --models {args.models}" if args.models != parser.get_default("models") else ""
    ) + (f" --rounds {args.rounds}" if args.rounds != 3 else "")
    text = report(results, threads, args.rounds, command)
    print(text)
    if not args.no_write:
        print(f"wrote {write_section('worker', text)}")


if __name__ == "__main__":
    main()
