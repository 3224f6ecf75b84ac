"""The evaluation loop: every configuration on every problem, through one router.

Fairness: all configurations run in this one process against the same router and
workers; problems are interleaved across configurations (problem 1 under every
config, then problem 2, ...), with the config order rotated per problem so none
is always first after a model switch; every config gets the same sampling seed
for the same (problem, repeat). One problem runs at a time, as in the paper, so
latency is the wall time of one problem alone.
"""
from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc
from tqdm import tqdm

from evaluation import answers
from evaluation.client import RouterClient, WorkerClient
from evaluation.configs import Config
from evaluation.dataset import Problem
from evaluation.results import ResultsFile
from evaluation.stack import scrape, usage_delta
from services.router.api import Budgets, Message, ReasonRequest, SamplingOptions, Step
from services.router.api.types import RoleStats

PROMPT = (
    "{question}\n\nSolve the problem step by step. Separate the steps with a blank line. "
    "Put the final answer in \\boxed{{}}."
)


@dataclass
class RunOptions:
    configs: list[Config]
    problems: list[Problem]
    dataset_fingerprint: str = ""
    repeats: int = 1
    seed: int = 0
    step_tokens: int = 256
    thinking_tokens: int = 1024
    answer_tokens: int = 512
    max_steps: int = 32
    temperature: float = 0.6
    top_p: float = 0.95
    timeout_s: float = 1800.0
    calibrate_every: int = 10  # problems between decode-speed calibrations (0: never)
    calibration_tokens: int = 32  # greedy tokens each model decodes per calibration
    prompt_template: str = PROMPT
    models: dict[str, str] = field(default_factory=dict)
    # Config label -> run it on the first N problems only (a costly config
    # measured on a subset, still interleaved with the others).
    config_limits: dict[str, int] = field(default_factory=dict)

    def meta(self) -> dict:
        return {
            "kind": "meta",
            "version": 1,
            "dataset_fingerprint": self.dataset_fingerprint,
            "seed": self.seed,
            "budgets": {"step_tokens": self.step_tokens, "thinking_tokens": self.thinking_tokens,
                        "answer_tokens": self.answer_tokens, "max_steps": self.max_steps},
            "sampling": {"temperature": self.temperature, "top_p": self.top_p},
            "prompt_template": self.prompt_template,
            "models": self.models,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


class RunAborted(RuntimeError):
    """Requests keep failing: the system is down, not one problem hard."""


@dataclass
class Task:
    repeat: int
    problem: Problem
    config: Config

    @property
    def key(self) -> tuple[str, str, int]:
        return self.config.label, self.problem.id, self.repeat


@dataclass
class Outcome:
    total: int
    done: int
    ran: int
    errors: int


def messages(problem: Problem, template: str = PROMPT) -> list[tuple[str, str]]:
    return [("user", template.format(question=problem.question))]


def seed_for(seed: int, problem_id: str, repeat: int) -> int:
    """The sampling seed of one (problem, repeat), the same under every config."""
    digest = hashlib.sha256(f"{seed}/{problem_id}/{repeat}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def plan(opts: RunOptions) -> list[Task]:
    tasks = []
    n = len(opts.configs)
    for r in range(opts.repeats):
        for i, p in enumerate(opts.problems):
            k = (i + r) % n
            for c in opts.configs[k:] + opts.configs[:k]:
                if i < opts.config_limits.get(c.label, len(opts.problems)):
                    tasks.append(Task(r, p, c))
    return tasks


def request(task: Task, opts: RunOptions) -> ReasonRequest:
    return ReasonRequest(
        messages=[Message(r, c) for r, c in messages(task.problem, opts.prompt_template)],
        routing=task.config.routing(),
        budgets=Budgets(opts.step_tokens, opts.thinking_tokens, opts.answer_tokens, opts.max_steps),
        sampling=SamplingOptions(opts.temperature, opts.top_p, seed_for(opts.seed, task.problem.id, task.repeat)),
        include_token_ids=True,
    )


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x  # JSON has no NaN


def _role_stats(s: RoleStats) -> dict:
    return {"steps": s.steps, "generated": s.generated_tokens, "discarded": s.discarded_tokens, "glimpses": s.glimpses,
            "prefilled": s.prefilled_tokens, "cached": s.cached_tokens, "worker_ms": s.worker_ms}


def step_dict(s: Step) -> dict:
    return {
        "index": s.index, "role": s.role.value if s.role else "", "entropy": _num(s.entropy), "threshold": _num(s.threshold),
        "tokens": s.tokens, "discarded": s.discarded_tokens, "prefilled": s.prefilled_tokens,
        "cached": s.cached_tokens, "latency_ms": s.latency_ms, "worker_ms": s.worker_ms,
        "finish": s.finish_reason, "text": s.text, "ids": list(s.token_ids),
        # Prompt tokens the step's worker calls prefilled while the request waited, and
        # the workers' prefill time for them: what a switch between models costs.
        "critical_prefill_tokens": s.critical_prefill_tokens, "critical_prefill_ms": s.critical_prefill_ms,
    }


def glimpse_ms(config: Config, steps: list[dict], usage: dict | None) -> float | None:
    """Time the small model spent on glimpses that wrote nothing. Separate mode: every
    Glimpse call. Fused mode: the Step calls that escalated (a kept Step's glimpse
    is the prefill its step needed anyway) = all Step time (the router streams
    them: StepStream) less the kept steps'.
    Needs the small worker's counters; policies that do not glimpse cost 0."""
    if not config.glimpses:
        return 0.0
    if not usage or "small" not in usage:
        return None
    small = usage["small"]
    if config.mode == "separate":
        return small["Glimpse_s"] * 1e3
    kept = sum(s["worker_ms"] for s in steps if s["role"] == "small")
    return max(0.0, (small["Step_s"] + small.get("StepStream_s", 0.0)) * 1e3 - kept)


class Runner:
    def __init__(self, opts: RunOptions, results: ResultsFile, router: RouterClient, *,
                 workers: dict[str, WorkerClient] | None = None, metrics: dict[str, str] | None = None,
                 progress: bool = True, on_record: Callable[[dict], None] | None = None) -> None:
        self.opts, self.results, self.router = opts, results, router
        self.workers = workers or {}
        self.metrics = metrics or {}
        self.progress = progress
        self.on_record = on_record  # tests use it to interrupt the run

    # ---- one problem ---------------------------------------------------------------
    def _scrape(self) -> dict | None:
        if set(self.metrics) != {"small", "large"}:
            return None
        try:
            return {role: scrape(url) for role, url in self.metrics.items()}
        except OSError:
            return None

    def run_task(self, task: Task) -> dict:
        req = request(task, self.opts)
        base = {"config": task.config.label, "problem": task.problem.id, "repeat": task.repeat,
                "seed": req.sampling.seed}
        before = self._scrape()
        t0 = time.perf_counter()
        try:
            resp = self.router.reason(req, self.opts.timeout_s)
        except grpc.RpcError as exc:
            return {"kind": "error", **base, "code": exc.code().name if exc.code() else "", "error": exc.details() or str(exc),
                    "t": time.time()}
        latency = time.perf_counter() - t0
        after = self._scrape()
        usage = None
        if before is not None and after is not None:
            usage = {role: usage_delta(before[role], after[role]) for role in before}
            usage["shared_worker"] = self.metrics["small"] == self.metrics["large"]
        if resp.done is None:
            return {"kind": "error", **base, "code": "UNKNOWN", "error": "the router's stream ended before its done event",
                    "t": time.time()}
        g = answers.grade(resp.answer, task.problem.answer)
        steps = [step_dict(s) for s in resp.steps]
        st = resp.done.stats
        return {
            "kind": "result", **base,
            "correct": g.correct, "extracted": g.extracted, "gold": task.problem.answer, "method": g.method,
            "latency_s": latency,
            # As a user of the stream sees them: the first text (of a step or the answer),
            # and per delta the gap since the previous one over the tokens it carries.
            "ttft_s": resp.first_text_s,
            "itl_s": [round(x, 6) for x in resp.token_gaps_s],
            "session_id": resp.session_id,
            "prefix_mode": resp.started.prefix_mode.value if resp.started and resp.started.prefix_mode else "",
            "stats": {"latency_ms": st.latency_ms, "steps": st.steps, "intervention_rate": st.intervention_rate,
                      "thinking_tokens": st.thinking_tokens, "answer_tokens": st.answer_tokens,
                      "thinking_end": st.thinking_end, "answer_end": st.answer_end,
                      "small": _role_stats(st.small), "large": _role_stats(st.large)},
            "steps": steps,
            "answer": resp.answer,
            "worker_usage": usage,
            "glimpse_ms": glimpse_ms(task.config, steps, usage),
            "t": time.time(),
        }

    # ---- calibration ----------------------------------------------------------------
    def calibrate(self, done: int) -> dict | None:
        """Each model's decode speed now: ms per token over a few greedy tokens after a
        cached prompt (the ideal latency is priced with it)."""
        if set(self.workers) != {"small", "large"}:
            return None
        rec: dict = {"kind": "calibration", "done": done, "t": time.time()}
        msgs = messages(self.opts.problems[0], self.opts.prompt_template)
        for role, w in self.workers.items():
            ids, _ = w.render(msgs)
            r = w.generate(ids, max_tokens=self.opts.calibration_tokens, step_boundary="", stop_on_eos=False,
                           session_id=f"eval-calibrate-{role}")
            n = len(r.token_ids)
            rec[role] = {"ms_per_token": r.timings.decode_ms / max(1, n - 1), "tokens": n,
                         "prefill_ms": r.timings.prefill_ms, "model": w.info.model_id}
        return rec

    # ---- the run -----------------------------------------------------------------------
    def run(self) -> Outcome:
        tasks = plan(self.opts)
        done = self.results.done_keys()
        todo = [t for t in tasks if t.key not in done]
        bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="eval", unit="run",
                   disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        every = self.opts.calibrate_every
        rounds = 0  # problems (all their configs) finished in this run
        ran = errors = streak = 0
        tally: dict[str, list[int]] = {}
        for r in self.results.of_kind("result"):
            tally.setdefault(r["config"], [0, 0])
            tally[r["config"]][0] += bool(r["correct"])
            tally[r["config"]][1] += 1
        try:
            if todo and every:  # also on a resume: the machine's speed now is what counts
                self._write(self.calibrate(len(tasks) - len(todo)))
            for i, task in enumerate(todo):
                rec = self.run_task(task)
                self._write(rec)
                ran += 1
                if rec["kind"] == "error":
                    errors += 1
                    streak += 1
                    bar.write(f"{task.config.label} {task.problem.id}: {rec['code']} {rec['error']}")
                    if streak >= 3:
                        raise RunAborted(f"three requests in a row failed; the last: {rec['code']} {rec['error']}")
                else:
                    streak = 0
                    t = tally.setdefault(task.config.label, [0, 0])
                    t[0] += bool(rec["correct"])
                    t[1] += 1
                    bar.set_postfix_str(f"{task.config.label} {t[0]}/{t[1]} correct", refresh=False)
                bar.update(1)
                last_of_problem = i + 1 == len(todo) or todo[i + 1].problem.id != task.problem.id \
                    or todo[i + 1].repeat != task.repeat
                if last_of_problem:
                    rounds += 1
                    if every and rounds % every == 0 and i + 1 < len(todo):
                        self._write(self.calibrate(len(tasks) - len(todo) + i + 1))
            if todo and every:
                self._write(self.calibrate(len(tasks)))
        finally:
            bar.close()
        return Outcome(len(tasks), len(self.results.done_keys() & {t.key for t in tasks}), ran, errors)

    def _write(self, rec: dict | None) -> None:
        if rec is None:
            return
        self.results.append(rec)
        if self.on_record is not None:
            self.on_record(rec)
