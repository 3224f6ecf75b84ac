"""python -m evaluation (also `glimprouter eval`): accuracy against latency for routing
configurations, on a JSONL dataset of {"question", "answer"}.

Starts a private stack (Redis, a small and a large worker, a router) unless --router
names a running one, runs every configuration on every problem (interleaved, same
seeds), then writes results.jsonl, summary.json, summary.md and PNG plots to --out.
Ctrl-C stops it; the same command resumes from results.jsonl.

examples:
  python -m evaluation                                   # the sample set, default pair, default sweep
  python -m evaluation --limit 10 --policies large-only,glimpse --thresholds 0.5,1.0
  python -m evaluation --policies 'glimpse@0.9,glimpse@0.9:mode=separate,random:p=0.3,verify'
  python -m evaluation --router 127.0.0.1:50051 --step-sample 0
  python -m evaluation --policies 'glimpse@0.9:catch_up=eager,glimpse@0.9:catch_up=lazy' --layout pinned
  python -m evaluation --report-only --out eval-results  # re-aggregate and re-plot

policy specs: glimpse@TAU, large-only, small-only, random:p=P, verify:accept_score=S,
step-entropy@TAU, adaptive:target=T; add :mode=separate, :entropy=full, :top_k=K,
:catch_up=eager|lazy (unset: the router's --catch-up).
A glimpse or step-entropy spec without @TAU runs once per --thresholds value.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Sequence

from evaluation import aggregate, configs, dataset, plots, report
from evaluation.results import ResultsFile, ResumeMismatch
from evaluation.stack import LAYOUTS, SIM_MODELS

DEFAULT_POLICIES = "large-only,small-only,glimpse"
DEFAULT_THRESHOLDS = "0.3,0.6,0.9,1.2"


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("what to run")
    g.add_argument("--data", default=str(dataset.SAMPLE), help="JSONL dataset (default: the shipped sample set)")
    g.add_argument("--limit", type=int, default=0, help="first N problems only (0: all)")
    g.add_argument("--policies", default=DEFAULT_POLICIES, help=f"comma-separated policy specs (default {DEFAULT_POLICIES})")
    g.add_argument("--thresholds", type=_floats, default=_floats(DEFAULT_THRESHOLDS),
                   help=f"tau sweep for glimpse/step-entropy specs without @TAU (default {DEFAULT_THRESHOLDS})")
    g.add_argument("--repeats", type=int, default=1, help="runs of each (config, problem), each with its own seed")
    g.add_argument("--seed", type=int, default=0, help="base seed; a problem gets the same seed under every config")
    g = ap.add_argument_group("budgets and sampling")
    g.add_argument("--step-tokens", type=int, default=256)
    g.add_argument("--thinking-tokens", type=int, default=1024)
    g.add_argument("--answer-tokens", type=int, default=512)
    g.add_argument("--max-steps", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.6)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--timeout", type=float, default=1800.0, help="seconds one problem may take")
    g = ap.add_argument_group("the system (started here unless --router is given)")
    g.add_argument("--router", default="", help="host:port of a running router")
    g.add_argument("--small-worker", default="", help="with --router: the small worker's host:port (step analysis, calibration)")
    g.add_argument("--large-worker", default="", help="with --router: the large worker's host:port")
    g.add_argument("--small", default="qwen2.5-coder-0.5b", help="small model id or file (default %(default)s)")
    g.add_argument("--large", default="qwen2.5-coder-1.5b", help="large model id or file (default %(default)s)")
    g.add_argument("--backend", default="llamacpp", choices=["llamacpp", "sim", "trtllm"])
    g.add_argument("--threads", type=int, default=0, help="llama.cpp threads per worker (0: all cores)")
    g.add_argument("--layout", default="default", choices=list(LAYOUTS),
                   help="default: both workers on all cores; pinned: each worker on a core of its own (taskset, "
                        "1 thread); sim: sim workers with a GPU pair's latencies (see evaluation/stack.py)")
    g.add_argument("--context-length", type=int, default=4096)
    g.add_argument("--redis-url", default="", help="Redis for the started router (default: a private redis-server)")
    g.add_argument("--small-args", default="", help="extra flags for the small worker, e.g. '--sim-hard-steps 1,3'")
    g.add_argument("--large-args", default="", help="extra flags for the large worker")
    g = ap.add_argument_group("measurements")
    g.add_argument("--step-sample", type=int, default=40, help="steps for the step-level analysis (0: skip)")
    g.add_argument("--step-check-tokens", type=int, default=64,
                   help="tokens of each step the analysis compares (both models' greedy continuations)")
    g.add_argument("--calibrate-every", type=int, default=10,
                   help="problems between decode-speed calibrations, for the ideal latency (0: never)")
    g = ap.add_argument_group("output")
    g.add_argument("--out", default="eval-results", help="output directory (default %(default)s); a rerun resumes it")
    g.add_argument("--fresh", action="store_true", help="discard the results already in --out and start over")
    g.add_argument("--report-only", action="store_true", help="only aggregate and plot what --out holds")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--verbose", action="store_true", help="show the services' logs")
    return ap


def finish(out: Path, results: ResultsFile, make_plots: bool = True) -> dict:
    summary = aggregate.summarize(results.records)
    names = plots.write_all(summary, results.records, out) if make_plots else []
    js, md = report.write(summary, out, names)
    print(report.markdown(summary).split("## Choosing tau")[0].rstrip())
    print(f"\nwrote {js}, {md}" + "".join(f", {out / n}" for n in names))
    if make_plots and not plots.AVAILABLE:
        print("plots skipped: matplotlib is not installed (pip install -e '.[eval]')")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.layout == "sim":  # sim workers: name them after what they model, unless named
        ap = parser()
        if args.small == ap.get_default("small"):
            args.small = SIM_MODELS["small"]
        if args.large == ap.get_default("large"):
            args.large = SIM_MODELS["large"]
    out = Path(args.out)
    results_path = out / "results.jsonl"
    if args.report_only:
        if not results_path.exists():
            print(f"error: {results_path} does not exist", file=sys.stderr)
            return 2
        finish(out, ResultsFile(results_path), not args.no_plots)
        return 0
    try:
        problems_all = dataset.load(args.data)
        cfgs = configs.expand([s for s in args.policies.split(",") if s.strip()], args.thresholds)
    except (dataset.DatasetError, configs.ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problems = problems_all[: args.limit] if args.limit > 0 else problems_all
    if args.fresh and results_path.exists():
        shutil.move(results_path, results_path.with_suffix(".jsonl.old"))
        print(f"moved the previous results to {results_path.with_suffix('.jsonl.old')}")
    from evaluation import run

    try:
        return run.execute(args, problems, dataset.fingerprint(problems_all), cfgs, out, results_path)
    except ResumeMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
