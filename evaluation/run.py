"""`python -m evaluation` after argument checking: bring the system up (or connect to
it), run the plan, the step analysis, and write the report. Ctrl-C at any point
leaves results.jsonl consistent; the same command resumes it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluation import steps
from evaluation.client import RouterClient, WorkerClient
from evaluation.configs import Config
from evaluation.dataset import Problem
from evaluation.results import ResultsFile
from evaluation.runner import RunAborted, RunOptions, Runner, plan
from evaluation.stack import StackError, StackOptions, start


def run_options(args: argparse.Namespace, problems: list[Problem], fingerprint: str, cfgs: list[Config],
                models: dict[str, str]) -> RunOptions:
    return RunOptions(
        configs=cfgs, problems=problems, dataset_fingerprint=fingerprint, repeats=args.repeats, seed=args.seed,
        step_tokens=args.step_tokens, thinking_tokens=args.thinking_tokens, answer_tokens=args.answer_tokens,
        max_steps=args.max_steps, temperature=args.temperature, top_p=args.top_p, timeout_s=args.timeout,
        calibrate_every=args.calibrate_every, models=models,
    )


def execute(args: argparse.Namespace, problems: list[Problem], fingerprint: str, cfgs: list[Config], out: Path,
            results_path: Path) -> int:
    from evaluation.__main__ import finish

    results = ResultsFile(results_path)
    stack = None
    workers: dict[str, WorkerClient] = {}
    router: RouterClient | None = None
    try:
        if args.router:
            addrs = {"small": args.small_worker, "large": args.large_worker}
            workers = {role: WorkerClient(a) for role, a in addrs.items() if a}
            models = {"router": args.router, **{role: w.info.model_id for role, w in workers.items()}}
        else:
            models = {"small": args.small, "large": args.large}
        opts = run_options(args, problems, fingerprint, cfgs, models)
        # Checked before anything starts: a mismatched rerun fails at once.
        results.check_or_write_meta(opts.meta())
        todo = len({t.key for t in plan(opts)} - results.done_keys())
        checks_todo = args.step_sample > 0 and bool(steps.sample(results, args.step_sample, args.seed))
        if todo or checks_todo:
            metrics: dict[str, str] = {}
            if not args.router:
                print(f"starting redis, workers ({args.small}, {args.large}) and a router ...", file=sys.stderr, flush=True)
                stack = start(StackOptions(args.small, args.large, args.backend, args.threads, args.context_length,
                                           args.redis_url, args.small_args, args.large_args, args.verbose,
                                           layout=args.layout))
                workers = {role: WorkerClient(a) for role, a in stack.workers.items()}
                metrics = stack.metrics
            router = RouterClient(stack.router if stack else args.router)
            Runner(opts, results, router, workers=workers, metrics=metrics, progress=not args.quiet).run()
            if args.step_sample > 0:
                if set(workers) == {"small", "large"}:
                    steps.run(results, workers["small"], workers["large"], {p.id: p for p in problems},
                              n=args.step_sample, seed=args.seed, template=opts.prompt_template,
                              max_tokens=args.step_check_tokens, progress=not args.quiet)
                else:
                    print("step analysis skipped: it needs --small-worker and --large-worker with --router",
                          file=sys.stderr)
        finish(out, results, not args.no_plots)
        missing = len({t.key for t in plan(opts)} - results.done_keys())
        if missing:
            print(f"{missing} runs failed; rerun the same command to retry them", file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:
        done = len(results.done_keys())
        print(f"\ninterrupted: {done} results are in {results_path}; run the same command to resume", file=sys.stderr)
        return 130
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunAborted as exc:
        print(f"error: {exc}; the results so far are in {results_path}", file=sys.stderr)
        return 1
    finally:
        if router is not None:
            router.close()
        for w in workers.values():
            w.close()
        if stack is not None:
            stack.close()
