"""`make bench-worker`: what a worker costs per step, measured over real gRPC.

For each model (SmolLM2 and the default Qwen pair), on one worker process:
  1. glimpse latency against one decode step, with the prefix cached
     (the paper's bet is that a glimpse costs about one token: goal <= 1.2);
  2. prefill tokens (and step time) per step over a 10-step session, with KV
     reuse and with it switched off (a second worker started with --kv-reuse false);
  3. a kept step written by one fused Step call against Glimpse + Generate.
"""
from __future__ import annotations

import argparse
import statistics
import time

import grpc

from benchmarks.report import write_section
from glimprouter.v1 import worker_pb2 as pb
from glimprouter.v1 import worker_pb2_grpc
from services.common import procs
from services.worker import models

QUESTION = (
    "A baker makes 24 muffins in the morning and 18 in the afternoon. She sells 31 and gives 5 to a neighbour. "
    "How many muffins are left? Think step by step and separate the steps with a blank line."
)
STEPS = 10
STEP_TOKENS = 48


def ids(tokens) -> pb.Prompt:
    return pb.Prompt(token_ids=pb.TokenIds(ids=tokens))


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


class Worker:
    def __init__(self, model: str, *extra: str) -> None:
        path = models.resolve(model)
        self.svc = procs.start(
            f"worker-{model}",
            ["services.worker", "--model", str(path), "--port", "0", "--threads", "2", "--context-length", "4096", *extra],
            timeout=300,
        )
        self.channel = grpc.insecure_channel(self.svc.address)
        self.stub = worker_pb2_grpc.ModelWorkerStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.svc.stop()

    def prompt(self) -> list[int]:
        msg = pb.ChatMessage(role="user", content=QUESTION)
        return list(self.stub.RenderPrompt(pb.RenderPromptRequest(messages=[msg], add_generation_prompt=True)).token_ids)


def session(stub, prompt: list[int], sid: str) -> tuple[list[list[int]], list[dict]]:
    """Ten greedy steps, each extending the prefix with the previous step's tokens."""
    prefixes, rows = [], []
    prefix = list(prompt)
    for _ in range(STEPS):
        prefixes.append(list(prefix))
        t0 = time.perf_counter()
        r = stub.Step(pb.StepRequest(prompt=ids(prefix), threshold=float("inf"), session_id=sid,
                                     sampling=pb.Sampling(max_tokens=STEP_TOKENS)))
        ms = (time.perf_counter() - t0) * 1e3
        g = r.generation
        rows.append({"prefill": g.usage.prefilled_tokens, "cached": g.usage.cached_tokens, "ms": ms,
                     "decode_ms_per_token": g.timings.decode_ms / max(1, len(g.token_ids)), "tokens": len(g.token_ids)})
        prefix += list(g.token_ids)
        if g.finish_reason == pb.FINISH_REASON_EOS:
            prefix = list(prompt) + list(g.token_ids)[:-1]  # keep stepping from a live prefix
    return prefixes, rows


def glimpse_vs_decode(stub, prefixes: list[list[int]], sid: str) -> tuple[float, float]:
    glimpse_ms, decode_ms = [], []
    for p in prefixes:
        stub.Glimpse(pb.GlimpseRequest(prompt=ids(p[:-1]), session_id=sid))  # cache holds all but the last token
        t0 = time.perf_counter()
        stub.Glimpse(pb.GlimpseRequest(prompt=ids(p), session_id=sid))
        glimpse_ms.append((time.perf_counter() - t0) * 1e3)
        g = stub.Generate(pb.GenerateRequest(prompt=ids(p), session_id=sid, sampling=pb.Sampling(max_tokens=16),
                                             stop=pb.StopCondition(step_boundary="", stop_on_eos=False)))
        decode_ms.append(g.timings.decode_ms / max(1, len(g.token_ids) - 1))
    return median(glimpse_ms), median(decode_ms)


def fused_vs_separate(stub, prefixes: list[list[int]], sid: str) -> tuple[float, float]:
    fused, separate = [], []
    sampling = pb.Sampling(temperature=0.6, top_p=0.95, seed=7, max_tokens=STEP_TOKENS)
    for i, p in enumerate(prefixes):
        def run_fused():
            t0 = time.perf_counter()
            stub.Step(pb.StepRequest(prompt=ids(p), threshold=float("inf"), sampling=sampling, session_id=sid))
            fused.append((time.perf_counter() - t0) * 1e3)

        def run_separate():
            t0 = time.perf_counter()
            stub.Glimpse(pb.GlimpseRequest(prompt=ids(p), session_id=sid))
            stub.Generate(pb.GenerateRequest(prompt=ids(p), sampling=sampling, session_id=sid))
            separate.append((time.perf_counter() - t0) * 1e3)

        # Alternate the order so neither mode always finds the other's cache state.
        for run in ((run_fused, run_separate) if i % 2 == 0 else (run_separate, run_fused)):
            stub.Glimpse(pb.GlimpseRequest(prompt=ids(p), session_id=sid))  # same starting cache for both
            run()
    return median(fused), median(separate)


def bench_model(model: str) -> dict:
    w = Worker(model)
    try:
        prompt = w.prompt()
        prefixes, reuse_rows = session(w.stub, prompt, "bench")
        g_ms, d_ms = glimpse_vs_decode(w.stub, prefixes, "bench")
        f_ms, s_ms = fused_vs_separate(w.stub, prefixes, "bench")
    finally:
        w.close()
    cold = Worker(model, "--kv-reuse", "false")
    try:
        _, cold_rows = session(cold.stub, prompt, "bench")
    finally:
        cold.close()
    return {
        "model": model, "prompt": len(prompt), "glimpse_ms": g_ms, "decode_ms": d_ms,
        "reuse_prefill": statistics.mean(r["prefill"] for r in reuse_rows),
        "cold_prefill": statistics.mean(r["prefill"] for r in cold_rows),
        "reuse_step_ms": median([r["ms"] for r in reuse_rows]), "cold_step_ms": median([r["ms"] for r in cold_rows]),
        "fused_ms": f_ms, "separate_ms": s_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    results = []
    for m in args.models.split(","):
        print(f"benchmarking {m} ...", flush=True)
        results.append(bench_model(m))
        print(results[-1], flush=True)
    lines = [
        "## Worker",
        "",
        "Command: `make bench-worker` (`python -m benchmarks.worker_bench`). One worker per model over loopback gRPC,",
        f"2 threads; a 10-step greedy session ({STEP_TOKENS} tokens per step at most) on a word problem.",
        "",
        "| model | prompt tokens | glimpse ms (cached prefix) | decode ms/token | glimpse / decode | prefill tokens per step, KV reuse | same, no reuse | step ms, reuse | step ms, no reuse | kept step: fused Step ms | Glimpse + Generate ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['prompt']} | {r['glimpse_ms']:.1f} | {r['decode_ms']:.1f} | {r['glimpse_ms'] / r['decode_ms']:.2f} "
            f"| {r['reuse_prefill']:.1f} | {r['cold_prefill']:.1f} | {r['reuse_step_ms']:.0f} | {r['cold_step_ms']:.0f} "
            f"| {r['fused_ms']:.0f} | {r['separate_ms']:.0f} |"
        )
    lines += [
        "",
        "Glimpse latency is measured at the client (gRPC round trip included) with all but the last prompt token",
        "cached, as in a session where the previous step's tokens were just produced; decode ms/token is the",
        "worker's own decode time. Medians over the 10 steps.",
    ]
    print("\n".join(lines))
    if not args.no_write:
        print(f"wrote {write_section('worker', chr(10).join(lines))}")


if __name__ == "__main__":
    main()
