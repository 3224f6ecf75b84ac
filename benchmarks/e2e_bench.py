"""`make bench-e2e`: GlimpRouter end to end on the default pair, against the large
model alone and against its own ideal.

One process starts a private Redis, the two default workers and a router, then
runs (through evaluation.runner, interleaved problem by problem, same seeds):
  - glimpse at tau (fused) and large-only on the first --problems sample problems;
  - glimpse at tau in separate mode on the first --separate-problems of them;
  - decode-speed calibrations of both models every few problems;
  - the step-level analysis on --step-sample steps.
and writes the "e2e" section of docs/benchmarks.md:
  (a) latency and accuracy, glimpse against large-only;
  (b) measured / ideal, where ideal prices every generated token at its model's
      measured decode speed, with where the rest of the time went;
  (c) fused against separate glimpses: latency per kept step;
  (d) prompt tokens prefilled per session with KV reuse against a full re-prefill;
  plus the step-level AUROC.
Benchmarks report; nothing here fails on a number.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time

from benchmarks.report import ROOT, write_section
from evaluation import aggregate, configs, dataset, steps
from evaluation.client import RouterClient, WorkerClient
from evaluation.results import ResultsFile
from evaluation.runner import RunOptions, Runner
from evaluation.stack import StackOptions, start

COMMAND = "make bench-e2e"
OUT = ROOT / ".cache" / "bench-e2e"


def mean(xs) -> float:
    xs = list(xs)
    return statistics.fmean(xs) if xs else float("nan")


def fmt(x, spec=".2f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def run(args: argparse.Namespace) -> tuple[ResultsFile, RunOptions, float]:
    problems = dataset.load(dataset.SAMPLE)
    fused, separate = f"glimpse@{args.tau:g}", f"glimpse@{args.tau:g}:mode=separate"
    opts = RunOptions(
        configs=configs.expand([fused, separate, "large-only"], []),
        problems=problems[: args.problems],
        dataset_fingerprint=dataset.fingerprint(problems),
        seed=args.seed,
        step_tokens=256, thinking_tokens=1024, max_steps=32,
        # Often and short: on a shared machine the speed drifts, and each problem is
        # priced with the calibrations around it.
        calibrate_every=args.calibrate_every, calibration_tokens=24,
        models={"small": args.small, "large": args.large},
        config_limits={separate: args.separate_problems},
    )
    if args.report_only:
        results = ResultsFile(OUT / "results.jsonl")
        wall = next((r["wall_s"] for r in results.of_kind("bench")), float("nan"))
        return results, opts, wall
    if not args.resume and OUT.exists():
        shutil.rmtree(OUT)
    results = ResultsFile(OUT / "results.jsonl")
    results.check_or_write_meta(opts.meta())
    t0 = time.perf_counter()
    with start(StackOptions(args.small, args.large, threads=args.threads)) as stack:
        workers = {role: WorkerClient(a) for role, a in stack.workers.items()}
        router = RouterClient(stack.router)
        try:
            Runner(opts, results, router, workers=workers, metrics=stack.metrics, progress=sys.stderr.isatty()).run()
            if args.step_sample:
                steps.run(results, workers["small"], workers["large"], {p.id: p for p in opts.problems},
                          n=args.step_sample, seed=args.seed, template=opts.prompt_template,
                          max_tokens=args.step_check_tokens, progress=sys.stderr.isatty())
        finally:
            router.close()
            for w in workers.values():
                w.close()
    wall = time.perf_counter() - t0
    results.append({"kind": "bench", "wall_s": wall})  # so --report-only can say it
    return results, opts, wall


def latency_lines(by: dict[str, list[dict]], labels) -> list[str]:
    """Time to first token and inter-token latency, as the client of the stream saw them."""
    out = ["", "### Time to first token and inter-token latency", "",
           "| config | problems | TTFT p50 s | TTFT p90 s | ITL p50 ms | ITL p90 ms | ITL mean ms | tokens timed |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label in labels:
        rs = [r for r in by[label] if r.get("ttft_s") is not None]
        if not rs:
            continue
        ttft = sorted(r["ttft_s"] for r in rs)
        gaps = sorted(g for r in rs for g in r.get("itl_s", []))
        q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")  # noqa: E731
        out.append(f"| {label} | {len(rs)} | {q(ttft, 0.5):.2f} | {q(ttft, 0.9):.2f} | {1e3 * q(gaps, 0.5):.0f} "
                   f"| {1e3 * q(gaps, 0.9):.0f} | {1e3 * mean(gaps):.0f} | {len(gaps)} |")
    out += ["", "Measured by the benchmark's client on the router's stream (`services.router.api.client`): TTFT from "
            "the call to the first text of a step or the answer; ITL per delta, the gap since the previous one over "
            "the tokens it carries (the router sends a call's first text at once and the rest at most every "
            "`--stream-interval-ms`, 50 ms: slower than that, as on this CPU, each token comes alone). Glimpse's first "
            "token comes after a glimpse and, on a hard first step, the large model's prefill; the large model's "
            "tokens cost more each, so ITL tracks which model writes."]
    return out


def auroc(x) -> str:
    return "n/a (only one class in the sample)" if x is None else f"{x:.3f}"


def breakdown(results: list[dict], speed_of: dict[int, dict[str, float]]) -> dict:
    """Where a config's time went, per problem (seconds): the decode-only ideal,
    glimpses that wrote nothing, the rest of the workers' time (prompt and hand-off
    prefills, decode slower than calibrated), and time outside the workers (router,
    Redis, gRPC, client)."""
    lat = mean(r["latency_s"] for r in results)
    worker = mean(sum(s["worker_ms"] for s in r["steps"]) / 1e3 for r in results)
    ideal = mean(aggregate.ideal_seconds(r, speed_of.get(id(r), {})) or 0.0 for r in results)
    glimpse = mean((r["glimpse_ms"] or 0.0) / 1e3 for r in results)
    return {"latency": lat, "ideal": ideal, "glimpse": glimpse, "worker_rest": worker - ideal - glimpse,
            "outside": lat - worker}


def kept_steps(results: list[dict]) -> tuple[float, float, int]:
    """Mean latency of the steps the small model kept, per step and per token."""
    kept = [s for r in results for s in r["steps"] if s["role"] == "small"]
    tokens = sum(s["tokens"] for s in kept)
    per_token = sum(s["latency_ms"] for s in kept) / tokens if tokens else float("nan")
    return mean(s["latency_ms"] for s in kept), per_token, len(kept)


def section(results: ResultsFile, opts: RunOptions, wall_s: float, args: argparse.Namespace) -> str:
    summary = aggregate.summarize(results.records)
    rows = {r["config"]: r for r in summary["configs"]}
    fused, separate, large = (c.label for c in opts.configs)
    res = [r for r in results.of_kind("result")]
    by = {c: [r for r in res if r["config"] == c] for c in (fused, separate, large)}
    speed = summary["decode_ms_per_token"]
    local = aggregate.local_speeds(results.records)
    speed_of = {id(r): local.get(i, {}) for i, r in enumerate(results.records)}
    cals = [r for r in results.of_kind("calibration") if "large" in r]
    n = len(opts.problems)
    g, lo = rows.get(fused), rows.get(large)
    eval_cmd = (f"python -m evaluation --limit {n} --policies {fused},large-only "
                f"--step-sample {args.step_sample} --seed {args.seed}")
    minutes = f"{wall_s / 60:.1f} min" if wall_s == wall_s else "not recorded"
    lines = [
        "## End to end (default pair)",
        "",
        f"`python -m benchmarks.e2e_bench --problems {n} --separate-problems {args.separate_problems} "
        f"--step-sample {args.step_sample} --step-check-tokens {args.step_check_tokens} --calibrate-every "
        f"{args.calibrate_every}` (`{COMMAND}` runs it with its defaults): small `{args.small}`, large `{args.large}` in llama.cpp workers "
        f"(CPU), a router and a private Redis, started by the benchmark. The first {n} problems of the sample set "
        "(`evaluation/data/sample.jsonl`), one at a time, configurations interleaved problem by problem with the "
        f"same sampling seed per problem (temperature 0.6, top-p 0.95). Whole run: {minutes}. The "
        f"accuracy figures alone: `{eval_cmd}`.",
        "",
        "### Glimpse against the large model alone",
        "",
        "| config | problems | accuracy % | latency mean s | median s | p90 s | large-model steps % | tokens small / large |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in (fused, large):
        r = rows.get(label)
        if r:
            lines.append(f"| {label} | {r['n']} | {100 * r['accuracy']:.1f} ± {100 * r['accuracy_se']:.1f} "
                         f"| {fmt(r['latency_mean_s'])} | {fmt(r['latency_median_s'])} | {fmt(r['latency_p90_s'])} "
                         f"| {100 * r['large_share']:.1f} | {r['small_tokens']:.0f} / {r['large_tokens']:.0f} |")
    if g and lo:
        ratio = g["latency_mean_s"] / lo["latency_mean_s"]
        lines += ["", f"Glimpse at tau = {args.tau:g} takes {ratio:.2f}x the large model's mean latency "
                  f"({abs(100 * (1 - ratio)):.0f}% {'less' if ratio < 1 else 'more'}) with "
                  f"{100 * g['large_share']:.0f}% of steps on the large model; accuracy "
                  f"{100 * g['accuracy']:.1f}% against {100 * lo['accuracy']:.1f}% on the same {g['n']} problems."]
    lines += latency_lines(by, (fused, large, separate))
    lines += ["", "### Measured against the ideal", ""]
    if len(speed) == 2:
        spread = {role: (min(c[role]["ms_per_token"] for c in cals), max(c[role]["ms_per_token"] for c in cals))
                  for role in ("small", "large")}
        lines += [
            f"Decode speed measured in the same run by {len(cals)} calibrations (a few greedy tokens on each worker, "
            f"between problems): small {speed['small']:.1f} ms/token (median; {spread['small'][0]:.0f}-"
            f"{spread['small'][1]:.0f}), large {speed['large']:.1f} ms/token ({spread['large'][0]:.0f}-"
            f"{spread['large'][1]:.0f}). Ideal = each model's generated tokens x its ms/token, priced with the "
            "calibrations just before and after the problem: the same run with free prefills, free glimpses and no "
            "router. Goal: measured / ideal < 1.10.",
            "",
            "| config | problems | measured s | ideal s | measured / ideal | glimpses s | other worker time s "
            "| outside the workers s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label in (fused, separate, large):
            if by[label]:
                b = breakdown(by[label], speed_of)
                lines.append(f"| {label} | {len(by[label])} | {b['latency']:.2f} | {b['ideal']:.2f} "
                             f"| {rows[label]['measured_over_ideal']:.2f} | {b['glimpse']:.2f} | {b['worker_rest']:.2f} "
                             f"| {b['outside']:.2f} |")
        lines += ["", "Per problem, means. Other worker time: prompt prefill, the prefill of what the other model wrote "
                  "since this one's last call, sampling, and decode slower than calibrated (longer contexts); it is "
                  "negative when the machine ran faster during a problem than at the calibrations around it. Outside "
                  "the workers: router, Redis, gRPC and client. All processes share 2 cores with whatever else runs: "
                  "when the calibrations spread widely, read the ratio as rough."]
    else:
        lines.append("No calibration ran: ideal not available.")
    lines += ["", "### Fused against separate glimpses", ""]
    pairs = [(a, b) for a in by[fused] for b in by[separate] if a["problem"] == b["problem"]]
    if pairs:
        f_ms, f_tok, f_n = kept_steps([a for a, _ in pairs])
        s_ms, s_tok, s_n = kept_steps([b for _, b in pairs])
        same = sum(1 for a, b in pairs if [s["text"] for s in a["steps"]] == [s["text"] for s in b["steps"]])
        lines += [
            f"The first {len(pairs)} problems in both modes, same seeds. The steps came out identical on {same} of "
            f"{len(pairs)} problems: llama.cpp's logits depend on how a prefix was prefilled (the same tokens "
            "evaluated in one batch or in pieces, as the two modes' different call sequences leave the KV cache, "
            "differ by ~1e-3 in log-probability), which can flip a sampled token or a decision near tau. So kept steps "
            "differ in length, and ms per kept-step token compares the modes fairly.",
            "",
            "| mode | kept steps | latency per kept step ms | ms per kept-step token | latency per problem s |",
            "|---|---:|---:|---:|---:|",
            f"| fused (one Step call) | {f_n} | {f_ms:.0f} | {f_tok:.1f} | {mean(a['latency_s'] for a, _ in pairs):.2f} |",
            f"| separate (Glimpse, then Generate) | {s_n} | {s_ms:.0f} | {s_tok:.1f} "
            f"| {mean(b['latency_s'] for _, b in pairs):.2f} |",
        ]
    lines += ["", "### Prefill per session: KV reuse against a full re-prefill", "",
              "| config | prompt tokens prefilled per problem | with no KV reuse | saved |", "|---|---:|---:|---:|"]
    for label in (fused, separate, large):
        r = rows.get(label)
        if r and r["prefill_tokens"] is not None:
            lines.append(f"| {label} | {r['prefill_tokens']:.0f} | {r['reprefill_tokens']:.0f} "
                         f"| {100 * (1 - r['prefill_tokens'] / r['reprefill_tokens']):.0f}% |")
    lines += ["", "Counted by the workers themselves (their prompt-token counters around each problem, every call "
              "included: glimpses, steps, answers); with no KV reuse every call re-reads its whole prompt. The "
              "workers reuse KV state by common prefix across sessions too, so a configuration that follows another "
              "on the same problem finds the prompt already there (the config order rotates per problem)."]
    sa = summary.get("step_analysis")
    if sa:
        lines += ["", "### Does first-token entropy find the steps the models disagree on?", "",
                  f"{sa['n']} steps sampled from these trajectories; greedy continuations of the same prefix by both "
                  f"models: {100 * sa['agree_step_rate']:.0f}% identical steps (within the first "
                  f"{args.step_check_tokens} tokens), {100 * sa['agree_first_rate']:.0f}% identical first tokens. AUROC of the small model's first-token entropy for a differing step: "
                  f"{auroc(sa['auroc_step'])}; for a differing first token: {auroc(sa['auroc_first'])} "
                  "(0.5 = chance). Few steps: a coarse figure; `python -m evaluation` with a larger `--step-sample` "
                  "measures it better."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=10, help="sample problems for glimpse and large-only")
    ap.add_argument("--separate-problems", type=int, default=4, help="of those, how many also run in separate mode")
    ap.add_argument("--tau", type=float, default=0.9)
    ap.add_argument("--step-sample", type=int, default=12, help="steps for the AUROC (0: skip)")
    ap.add_argument("--step-check-tokens", type=int, default=48, help="tokens of each step the AUROC compares")
    ap.add_argument("--calibrate-every", type=int, default=1, help="problems between decode-speed calibrations")
    ap.add_argument("--small", default="qwen2.5-coder-0.5b")
    ap.add_argument("--large", default="qwen2.5-coder-1.5b")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help=f"continue the run in {OUT.relative_to(ROOT)} instead of starting over")
    ap.add_argument("--report-only", action="store_true", help=f"rewrite the section from the last run in {OUT.relative_to(ROOT)}")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args(argv)
    try:
        results, opts, wall = run(args)
    except KeyboardInterrupt:
        print(f"\ninterrupted; `python -m benchmarks.e2e_bench --resume` continues from {OUT}", file=sys.stderr)
        return 130
    body = section(results, opts, wall, args)
    print(body)
    if not args.no_write:
        print(f"wrote {write_section('e2e', body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
