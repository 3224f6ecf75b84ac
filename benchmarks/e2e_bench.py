"""`make bench-e2e`: GlimpRouter end to end, with eager and lazy catch-up, against the
large model alone and against its own ideal, in three layouts of the two workers.

For each layout in --layouts, one after the other, the benchmark starts a private
Redis, the two workers and a router (evaluation.stack), runs through
evaluation.runner, interleaved problem by problem with the same sampling seeds:
  - glimpse at tau (fused) with eager catch-up, the same with lazy catch-up, and
    large-only, on the first problems of the sample set;
  - decode-speed calibrations of both models between problems (the ideal's prices);
and stops the stack. Layouts (evaluation/stack.py):
  default  the default pair (llama.cpp, CPU), both workers on all cores;
  pinned   the same pair, each worker on a core of its own (taskset, one thread);
  sim      sim workers whose decode and prefill latencies model a GPU pair.
The default layout can also run, on request: glimpse in separate mode on the first
--separate-problems problems (fused against separate glimpses) and the step-level
AUROC on --step-sample steps. Each layout writes its own results file under
.cache/bench-e2e/<layout>/, and the report is the "e2e" section of docs/benchmarks.md:
per layout, accuracy, latency, ideal, measured/ideal and that ratio against
large-only's, switches between models per problem and the prefill each switch left
on the critical path; for the default layout also time to first token and
inter-token latency, where the time went, prefill with and without KV reuse.
Benchmarks report; nothing here fails on a number.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field

from benchmarks.report import ROOT, write_section
from evaluation import aggregate, configs, dataset, steps
from evaluation.client import RouterClient, WorkerClient
from evaluation.results import ResultsFile
from evaluation.runner import RunAborted, RunOptions, Runner, plan
from evaluation.stack import LAYOUTS, SIM_MODELS, SimPair, StackError, StackOptions, pinned_cpus, start
from services.common.procs import ServiceFailed
from services.router.catchup import DEFAULT_CHUNK_TOKENS
from services.worker.backends.sim import SimModel

COMMAND = "make bench-e2e"
OUT = ROOT / ".cache" / "bench-e2e"
OUT_NAME = str(OUT.relative_to(ROOT))  # for help texts
REAL = ("default", "pinned")  # layouts with real models (accuracy means something)


def mean(xs) -> float:
    xs = list(xs)
    return statistics.fmean(xs) if xs else float("nan")


def fmt(x, spec=".2f") -> str:
    return "-" if x is None or x != x else format(x, spec)


# ---- what runs ------------------------------------------------------------------------------
@dataclass
class Labels:
    eager: str
    lazy: str
    large: str = "large-only"
    separate: str = ""

    @classmethod
    def of(cls, tau: float) -> "Labels":
        g = f"glimpse@{tau:g}"
        return cls(f"{g}:catch_up=eager", f"{g}:catch_up=lazy", "large-only", f"{g}:mode=separate:catch_up=eager")


@dataclass
class LayoutRun:
    layout: str
    opts: RunOptions
    results: ResultsFile | None = None
    wall_s: float = float("nan")
    skipped: str = ""  # why this layout did not run
    extra: dict = field(default_factory=dict)


def layout_options(layout: str, args: argparse.Namespace, problems) -> tuple[RunOptions, StackOptions]:
    lb = Labels.of(args.tau)
    specs = [lb.eager, lb.lazy, lb.large]
    limits = {}
    if layout == "default" and args.separate_problems > 0:
        specs.append(lb.separate)
        limits[lb.separate] = args.separate_problems
    sim = layout == "sim"
    n = args.sim_problems if sim else args.problems
    models = dict(SIM_MODELS) if sim else {"small": args.small, "large": args.large}
    opts = RunOptions(
        configs=configs.expand(specs, []),
        problems=problems[:n],
        dataset_fingerprint=dataset.fingerprint(problems),
        seed=args.seed,
        step_tokens=args.step_tokens, thinking_tokens=args.thinking_tokens, max_steps=args.max_steps,
        # Often and short: on a shared machine the speed drifts, and each problem is
        # priced with the calibrations around it.
        calibrate_every=args.calibrate_every, calibration_tokens=24,
        models={**models, "layout": layout},
        config_limits=limits,
    )
    stack = StackOptions(models["small"], models["large"], threads=args.threads if layout == "default" else 0,
                         layout=layout)
    return opts, stack


def layouts_of(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in out if x not in LAYOUTS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"layouts are a comma-separated subset of {','.join(LAYOUTS)}, got {text!r}")
    return out


class ProblemLines:
    """One progress line per problem, once all its configurations ran."""

    def __init__(self, layout: str, opts: RunOptions, results: ResultsFile) -> None:
        self.layout = layout
        self.expected: dict[str, set] = {}
        for t in plan(opts):
            self.expected.setdefault(t.problem.id, set()).add(t.key)
        self.order = list(self.expected)
        self.seen = set(results.done_keys())
        self.results = results
        self.t0 = time.perf_counter()

    def __call__(self, rec: dict) -> None:
        if rec.get("kind") not in ("result", "error"):
            return
        self.seen.add((rec["config"], rec["problem"], rec["repeat"]))
        pid = rec["problem"]
        if not self.expected.get(pid, {None}) <= self.seen:
            return
        mine = [r for r in self.results.records if r.get("kind") in ("result", "error") and r["problem"] == pid]
        last = {}
        for r in mine:
            last[r["config"]] = r
        parts = []
        for label, r in last.items():
            if r["kind"] == "error":
                parts.append(f"{label} failed ({r['code']})")
            else:
                mark = "" if self.layout == "sim" else (" correct" if r["correct"] else " wrong")
                parts.append(f"{label} {r['latency_s']:.1f} s{mark}")
        k = self.order.index(pid) + 1
        print(f"[{self.layout}] problem {k}/{len(self.order)} {pid}: {'; '.join(parts)} "
              f"({(time.perf_counter() - self.t0) / 60:.1f} min in this layout)", file=sys.stderr, flush=True)


def run_layout(layout: str, args: argparse.Namespace, problems) -> LayoutRun:
    opts, stack_opts = layout_options(layout, args, problems)
    out = OUT / layout
    run = LayoutRun(layout, opts)
    if args.report_only:
        path = out / "results.jsonl"
        if not path.exists():
            run.skipped = f"no results in {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
            return run
        run.results = ResultsFile(path)
        bench = [r for r in run.results.of_kind("bench")]
        run.wall_s = sum(r["wall_s"] for r in bench) if bench else float("nan")
        if bench and "cpus" in bench[-1]:
            run.extra["cpus"] = tuple(bench[-1]["cpus"])
        return run
    if layout == "pinned":
        try:
            run.extra["cpus"] = pinned_cpus()
        except StackError as exc:
            run.skipped = str(exc)
            print(f"[{layout}] not run: {exc}", file=sys.stderr, flush=True)
            return run
    if not args.resume and out.exists():
        shutil.rmtree(out)
    results = ResultsFile(out / "results.jsonl")
    results.check_or_write_meta(opts.meta())
    run.results = results
    print(f"[{layout}] starting redis, workers ({stack_opts.small}, {stack_opts.large}) and a router; "
          f"{len(opts.problems)} problems x {len(opts.configs)} configurations", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        with start(stack_opts) as stack:
            workers = {role: WorkerClient(a) for role, a in stack.workers.items()}
            router = RouterClient(stack.router)
            try:
                Runner(opts, results, router, workers=workers, metrics=stack.metrics, progress=sys.stderr.isatty(),
                       on_record=ProblemLines(layout, opts, results)).run()
                if layout == "default" and args.step_sample:
                    steps.run(results, workers["small"], workers["large"], {p.id: p for p in opts.problems},
                              n=args.step_sample, seed=args.seed, template=opts.prompt_template,
                              max_tokens=args.step_check_tokens, progress=sys.stderr.isatty())
            finally:
                router.close()
                for w in workers.values():
                    w.close()
    except (StackError, ServiceFailed, RunAborted) as exc:
        # One layout that cannot run (or whose services die) does not cost the others'.
        done = len(results.done_keys())
        run.skipped = f"{exc} ({done} runs finished before; `--resume --layouts {layout}` continues)"
        print(f"[{layout}] stopped: {exc}", file=sys.stderr, flush=True)
        return run
    run.wall_s = time.perf_counter() - t0
    # So --report-only can say how long it took (a resumed layout adds its parts).
    rec = {"kind": "bench", "layout": layout, "wall_s": run.wall_s, "args": {k: getattr(args, k) for k in STORED}}
    if "cpus" in run.extra:
        rec["cpus"] = list(run.extra["cpus"])
    results.append(rec)
    if args.resume:
        run.wall_s = sum(r["wall_s"] for r in results.of_kind("bench"))
    print(f"[{layout}] done in {run.wall_s / 60:.1f} min", file=sys.stderr, flush=True)
    return run


# The flags a report states, stored with each layout's run so --report-only states them.
STORED = ("problems", "sim_problems", "separate_problems", "step_sample", "step_check_tokens", "tau", "step_tokens",
          "thinking_tokens", "max_steps", "small", "large", "threads", "seed")


def stored_args(args: argparse.Namespace) -> argparse.Namespace:
    """For --report-only: the flags the last run of these layouts used (the first found)."""
    for layout in args.layouts:
        path = OUT / layout / "results.jsonl"
        if path.exists():
            bench = [r for r in ResultsFile(path).of_kind("bench") if "args" in r]
            if bench:
                return argparse.Namespace(**{**vars(args), **bench[-1]["args"]})
    return args


def run(args: argparse.Namespace) -> list[LayoutRun]:
    problems = dataset.load(dataset.SAMPLE)
    return [run_layout(layout, args, problems) for layout in args.layouts]


# ---- the report ---------------------------------------------------------------------------
def latency_lines(by: dict[str, list[dict]], labels) -> list[str]:
    """Time to first token and inter-token latency, as the client of the stream saw them."""
    out = ["", "#### Time to first token and inter-token latency", "",
           "| config | problems | TTFT p50 s | TTFT p90 s | ITL p50 ms | ITL p90 ms | ITL mean ms | tokens timed |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label in labels:
        rs = [r for r in by.get(label, []) if r.get("ttft_s") is not None]
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


def describe(run: LayoutRun, args: argparse.Namespace) -> str:
    if run.layout == "default":
        threads = f"`--threads {args.threads}`" + (": all cores" if args.threads == 0 else "")
        return (f"Both llama.cpp workers (small `{args.small}`, large `{args.large}`) on all of the machine's cores "
                f"({threads}): when both work at once, as eager catch-up makes them, they compete for the cores.")
    if run.layout == "pinned":
        cpus = run.extra.get("cpus")
        where = (f"the small worker pinned to CPU {cpus[0]} and the large to CPU {cpus[1]}" if cpus else
                 "the small worker pinned to the first CPU this process may use and the large to the second")
        return (f"The same pair, {where} (`taskset -c`), one "
                "llama.cpp thread each: two separate nodes of one core. Only the workers are pinned: the router, "
                "Redis and the benchmark's client share both cores with them.")
    p = SimPair()
    script = SimModel(seed=p.seed, hard_fraction=p.hard_fraction)
    hard = [i for i in range(p.steps) if script.is_hard(i)]
    return (f"`--backend sim` workers (no model; latencies are sleeps, one decode step per batch as on a GPU) "
            f"modelled on the paper's pair, Qwen3-4B and Qwen3-32B, each on one GPU: small "
            f"{1e3 * p.small.token_latency_s:.1f} ms per decoded token and {1e3 * p.small.prefill_latency_s:.3f} ms per "
            f"prefilled token, large {1e3 * p.large.token_latency_s:.1f} ms and {1e3 * p.large.prefill_latency_s:.3f} ms. "
            "Source: Qwen's published Qwen3 speed benchmark (qwen.readthedocs.io, \"Speed Benchmark\"): SGLang, one "
            "H20 96GB, BF16, batch 1, 2048 tokens generated after 1 or 6144 input tokens (Qwen3-4B 133.13 and 466.19 "
            "tokens/s, Qwen3-32B 20.72 and 77.82, counting input and output tokens); decode = the 1-token run's time "
            "/ 2048, prefill = the extra time of the 6144-token run / 6143 (an upper bound: it includes decoding over "
            "the longer context). The paper ran vLLM on A100-80GB, for which no per-token batch-1 figures are "
            f"published. Script: {p.steps} steps of {p.step_tokens} tokens, the `</think>` step, then a 4-token answer "
            f"by the large model; each step hard (first-token entropy ~3 nats) with probability {p.hard_fraction:g} "
            f"(seed {p.seed}: steps {', '.join(map(str, hard))}, so glimpse sends {len(hard)} of {p.steps + 1} steps, "
            f"{100 * len(hard) / (p.steps + 1):.0f}%, to the large model; the real pair: 25-50%). The script is the "
            "same for every problem: problems differ only in prompt length and sampling seed, and accuracy means "
            "nothing here.")


def layout_lines(run: LayoutRun, args: argparse.Namespace, lb: Labels) -> list[str]:
    title = {"default": "Default: both workers on all cores", "pinned": "Pinned: one core per worker",
             "sim": "Sim: a modelled GPU pair"}[run.layout]
    lines = ["", f"### {title}", "", describe(run, args)]
    if run.skipped:
        return lines + ["", f"Not run: {run.skipped}."]
    results = run.results
    assert results is not None
    summary = aggregate.summarize(results.records)
    rows = {r["config"]: r for r in summary["configs"]}
    res = list(results.of_kind("result"))
    labels = [c.label for c in run.opts.configs]
    by = {c: [r for r in res if r["config"] == c] for c in labels}
    speed = summary["decode_ms_per_token"]
    local = aggregate.local_speeds(results.records)
    speed_of = {id(r): local.get(i, {}) for i, r in enumerate(results.records)}
    cals = [r for r in results.of_kind("calibration") if "large" in r]
    minutes = f"{run.wall_s / 60:.1f} min" if run.wall_s == run.wall_s else "not recorded"
    n = len({r["problem"] for r in res}) or len(run.opts.problems)  # what ran (a report may mix runs' flags)
    lines += ["", f"The first {n} problem{'s' if n != 1 else ''} of the sample set; this layout's run took {minutes}."]
    lo = rows.get(lb.large)
    base = lo["measured_over_ideal"] if lo else None
    lines += ["", "| config | problems | accuracy % | latency mean s | ideal s | measured / ideal "
              "| (measured / ideal) / large-only's | switches per problem | critical prefill per switch: tokens "
              "| ms | caught-up tokens per problem |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label in labels:
        r = rows.get(label)
        if not r:
            continue
        acc = "n/a" if run.layout == "sim" else f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_se']:.1f}"
        moi = r["measured_over_ideal"]
        rel = moi / base if moi and base else None
        failed = f" (+{r['errors']} failed)" if r["errors"] else ""
        lines.append(f"| {label} | {r['n']}{failed} | {acc} | {fmt(r['latency_mean_s'])} | {fmt(r['ideal_s'])} | {fmt(moi)} | {fmt(rel)} "
                     f"| {fmt(r['switches_per_problem'], '.1f')} | {fmt(r['critical_prefill_tokens_per_switch'], '.1f')} "
                     f"| {fmt(r['critical_prefill_ms_per_switch'], '.0f')} | {fmt(r['caught_up_tokens'], '.0f')} |")
    e, z = rows.get(lb.eager), rows.get(lb.lazy)
    if e and base and e["measured_over_ideal"]:
        rel = e["measured_over_ideal"] / base
        per = e["critical_prefill_tokens_per_switch"]
        lines += ["", f"Glimpse with eager catch-up: measured / ideal {rel:.2f}x large-only's (goal: at most 1.05x); "
                  f"critical-path prefill {fmt(per, '.1f')} tokens per switch (goal: at most one catch-up chunk, "
                  f"{DEFAULT_CHUNK_TOKENS} tokens)"
                  + (f", against {fmt(z['critical_prefill_tokens_per_switch'], '.1f')} with lazy catch-up "
                     f"({fmt(z['measured_over_ideal'] / base if z['measured_over_ideal'] else None)}x large-only's "
                     "measured / ideal)." if z else ".")
                  + (f" Large-model steps: {100 * e['large_share']:.0f}% of {e['steps_per_problem']:.1f} per problem."
                     if e["large_share"] == e["large_share"] else "")]
    if len(speed) == 2:
        spread = {role: (min(c[role]["ms_per_token"] for c in cals), max(c[role]["ms_per_token"] for c in cals))
                  for role in ("small", "large")}
        lines += [
            "",
            f"Where the time went, per problem (s). Decode speed from {len(cals)} calibrations in this layout (a few "
            f"greedy tokens on each worker, between problems): small {speed['small']:.1f} ms/token (median; "
            f"{spread['small'][0]:.1f}-{spread['small'][1]:.1f}), large {speed['large']:.1f} ms/token "
            f"({spread['large'][0]:.1f}-{spread['large'][1]:.1f}).",
            "",
            "| config | measured | ideal | glimpses | other worker time | outside the workers |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for label in labels:
            if by[label]:
                b = breakdown(by[label], speed_of)
                lines.append(f"| {label} | {b['latency']:.2f} | {b['ideal']:.2f} | {b['glimpse']:.2f} "
                             f"| {b['worker_rest']:.2f} | {b['outside']:.2f} |")
    else:
        lines += ["", "No calibration ran: ideal not available."]
    if run.layout != "default":
        return lines
    lines += latency_lines(by, labels)
    if lb.separate in by and by[lb.separate]:
        pairs = [(a, b) for a in by[lb.eager] for b in by[lb.separate] if a["problem"] == b["problem"]]
        if pairs:
            f_ms, f_tok, f_n = kept_steps([a for a, _ in pairs])
            s_ms, s_tok, s_n = kept_steps([b for _, b in pairs])
            same = sum(1 for a, b in pairs if [s["text"] for s in a["steps"]] == [s["text"] for s in b["steps"]])
            lines += [
                "", "#### Fused against separate glimpses", "",
                f"The first {len(pairs)} problem{'s' if len(pairs) != 1 else ''} in both modes (eager catch-up), same seeds. The steps came out "
                f"identical on {same} of {len(pairs)} problems: llama.cpp's logits depend on how a prefix was "
                "prefilled (the same tokens evaluated in one batch or in pieces, as the two modes' different call "
                "sequences leave the KV cache, differ by ~1e-3 in log-probability), which can flip a sampled token or "
                "a decision near tau. So kept steps differ in length, and ms per kept-step token compares the modes "
                "fairly.",
                "",
                "| mode | kept steps | latency per kept step ms | ms per kept-step token | latency per problem s |",
                "|---|---:|---:|---:|---:|",
                f"| fused (one Step call) | {f_n} | {f_ms:.0f} | {f_tok:.1f} | {mean(a['latency_s'] for a, _ in pairs):.2f} |",
                f"| separate (Glimpse, then Generate) | {s_n} | {s_ms:.0f} | {s_tok:.1f} "
                f"| {mean(b['latency_s'] for _, b in pairs):.2f} |",
            ]
    lines += ["", "#### Prefill per session: KV reuse against a full re-prefill", "",
              "| config | prompt tokens prefilled per problem (calls) | with no KV reuse | saved | caught up ahead (Extend) |",
              "|---|---:|---:|---:|---:|"]
    for label in labels:
        r = rows.get(label)
        if r and r["prefill_tokens"] is not None and r["reprefill_tokens"]:
            lines.append(f"| {label} | {r['prefill_tokens']:.0f} | {r['reprefill_tokens']:.0f} "
                         f"| {100 * (1 - r['prefill_tokens'] / r['reprefill_tokens']):.0f}% "
                         f"| {fmt(r['caught_up_tokens'], '.0f')} |")
    lines += ["", "Counted by the workers themselves (their prompt-token counters around each problem, every call "
              "included: glimpses, steps, answers); with no KV reuse every call re-reads its whole prompt. Eager "
              "catch-up's Extend calls prefill ahead, counted apart (caught up): the calls then find those tokens "
              "cached. The workers reuse KV state by common prefix across sessions too, so a configuration that "
              "follows another on the same problem finds the prompt already there (the config order rotates per "
              "problem)."]
    sa = summary.get("step_analysis")
    if sa:
        lines += ["", "#### Does first-token entropy find the steps the models disagree on?", "",
                  f"{sa['n']} steps sampled from these trajectories; greedy continuations of the same prefix by both "
                  f"models: {100 * sa['agree_step_rate']:.0f}% identical steps (within the first "
                  f"{args.step_check_tokens} tokens), {100 * sa['agree_first_rate']:.0f}% identical first tokens. AUROC "
                  f"of the small model's first-token entropy for a differing step: {auroc(sa['auroc_step'])}; for a "
                  f"differing first token: {auroc(sa['auroc_first'])} (0.5 = chance). Few steps: a coarse figure; "
                  "`python -m evaluation` with a larger `--step-sample` measures it better."]
    return lines


def command_line(args: argparse.Namespace) -> str:
    parts = [f"--layouts {','.join(args.layouts)}", f"--problems {args.problems}", f"--sim-problems {args.sim_problems}",
             f"--separate-problems {args.separate_problems}", f"--step-sample {args.step_sample}"]
    for k in ("step_tokens", "thinking_tokens", "max_steps", "tau"):
        if getattr(args, k) != DEFAULTS[k]:
            parts.append(f"--{k.replace('_', '-')} {getattr(args, k):g}")
    return "python -m benchmarks.e2e_bench " + " ".join(parts)


def section(runs: list[LayoutRun], args: argparse.Namespace) -> str:
    lb = Labels.of(args.tau)
    total = sum(r.wall_s for r in runs if r.wall_s == r.wall_s)
    lines = [
        "## End to end: catch-up in three layouts",
        "",
        f"`{command_line(args)}` (`{COMMAND}` runs it with its defaults; whole run: {total / 60:.1f} min). Per layout, "
        "its own private Redis, two workers and a router, started and stopped by the benchmark in turn; the first "
        "problems of the sample set (`evaluation/data/sample.jsonl`), one at a time, the configurations interleaved "
        "problem by problem with the same sampling seed per problem (temperature 0.6, top-p 0.95; config order rotated "
        f"per problem): glimpse at tau = {args.tau:g} (fused) with eager catch-up (`{lb.eager}`: while one model "
        "writes a step, the other model's worker prefills its tokens in chunks through `Extend`), the same with lazy "
        f"catch-up (`{lb.lazy}`: the other model prefills what it missed at its next call), and `{lb.large}`"
        + (f"; in the default layout also `{lb.separate}` on the first "
           + (f"{args.separate_problems} problems" if args.separate_problems != 1 else "problem")
           if args.separate_problems > 0 and "default" in args.layouts else "")
        + f". Budgets: {args.step_tokens} tokens per step, {args.thinking_tokens} per problem, {args.max_steps} steps.",
        "",
        "Definitions. Ideal: each model's generated tokens times its ms per token, priced with the decode-speed "
        "calibrations just before and after the problem (a few greedy tokens on each worker): the same run with free "
        "prefills, free glimpses and no router. Measured / ideal over large-only's measured / ideal cancels the "
        "calibration's bias (goal for eager catch-up: at most 1.05). A *switch* is a change of model between two "
        "consecutive worker calls of a turn's steps, the calls being, per step: for glimpse, the small model's Step "
        "(which glimpses and, on a kept step, writes) and, when the step escalates, the large model's Generate; for "
        "large-only the large model's Generate (no switches; its figures per switch are \"-\"). The answer call of a "
        "thinking model (sim layout: the large model writes a 4-token answer after `</think>`) is not counted: the "
        "stream does not report its critical-path prefill. *Critical prefill per switch*: over the steps after the "
        "first (the first pays the prompt), the prompt tokens each step's worker calls prefilled while the request "
        "waited (`critical_prefill_tokens` of the router's Step events) and the workers' prefill time for them "
        "(`critical_prefill_ms`), summed over the problems and divided by their switches. Caught up: prompt tokens "
        "the workers prefilled ahead through `Extend` (their `glimprouter_worker_prompt_tokens_total{kind=\"caught_up\"}`), "
        "off the critical path.",
    ]
    for run in runs:
        lines += layout_lines(run, args, lb)
    lines += ["", "All processes share the machine's 2 cores with whatever else runs: when a layout's calibrations "
              "spread widely, read its ratios as rough; compare configurations within one layout, measured side by "
              "side."]
    if any(r.layout in REAL for r in runs):
        budgets = "".join(f" --{k.replace('_', '-')} {getattr(args, k)}" for k in ("step_tokens", "thinking_tokens", "max_steps")
                          if getattr(args, k) != DEFAULTS[k])
        lines += ["", f"The accuracy figures alone: `python -m evaluation --limit {args.problems} --policies "
                  f"{lb.eager},{lb.lazy},large-only{budgets} --step-sample 0 --seed {args.seed}` (add `--layout pinned` "
                  "for the pinned layout; catch-up changes only when prefill happens, never the tokens written)."]
    return "\n".join(lines)


# Sized to fit ~45 min on 2 cores: 6 real problems x 3 configurations take 12-16 min per
# real layout, the sim layout ~4 min; the AUROC costs ~10 s per sampled step.
DEFAULTS = {"problems": 6, "sim_problems": 8, "separate_problems": 1, "step_sample": 0, "tau": 0.9,
            "step_tokens": 256, "thinking_tokens": 1024, "max_steps": 32}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", type=layouts_of, default=layouts_of("default,pinned,sim"),
                    help="comma-separated layouts to run, in order (default: default,pinned,sim)")
    ap.add_argument("--problems", type=int, default=DEFAULTS["problems"],
                    help="sample problems per real-model layout (default, pinned)")
    ap.add_argument("--sim-problems", type=int, default=DEFAULTS["sim_problems"], help="sample problems in the sim layout")
    ap.add_argument("--separate-problems", type=int, default=DEFAULTS["separate_problems"],
                    help="default layout: of its problems, how many also run glimpse in separate mode (0: skip)")
    ap.add_argument("--tau", type=float, default=DEFAULTS["tau"])
    ap.add_argument("--step-sample", type=int, default=DEFAULTS["step_sample"],
                    help="default layout: steps for the AUROC (0: skip)")
    ap.add_argument("--step-check-tokens", type=int, default=48, help="tokens of each step the AUROC compares")
    ap.add_argument("--step-tokens", type=int, default=DEFAULTS["step_tokens"], help="budget: tokens per step")
    ap.add_argument("--thinking-tokens", type=int, default=DEFAULTS["thinking_tokens"], help="budget: tokens per problem")
    ap.add_argument("--max-steps", type=int, default=DEFAULTS["max_steps"], help="budget: steps per problem")
    ap.add_argument("--calibrate-every", type=int, default=1, help="problems between decode-speed calibrations")
    ap.add_argument("--small", default="qwen2.5-coder-0.5b")
    ap.add_argument("--large", default="qwen2.5-coder-1.5b")
    ap.add_argument("--threads", type=int, default=0, help="default layout: llama.cpp threads per worker (0: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true",
                    help=f"continue the runs in {OUT_NAME}/<layout> instead of starting them over")
    ap.add_argument("--report-only", action="store_true",
                    help=f"rewrite the section from the last runs in {OUT_NAME}/<layout>")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.report_only:
        args = stored_args(args)
    try:
        runs = run(args)
    except KeyboardInterrupt:
        print(f"\ninterrupted; `python -m benchmarks.e2e_bench --resume` (same flags) continues from {OUT}",
              file=sys.stderr)
        return 130
    body = section(runs, args)
    print(body)
    if not args.no_write:
        print(f"wrote {write_section('e2e', body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
