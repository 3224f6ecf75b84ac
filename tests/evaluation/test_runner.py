"""The run loop against a fake router: interleaving, seeds, interrupt and resume."""
from __future__ import annotations

import json

import pytest

from evaluation import configs
from evaluation.dataset import Problem
from evaluation.results import ResultsFile, ResumeMismatch
from evaluation.runner import RunOptions, Runner, plan

from .fakes import FakeRouter

PROBLEMS = [Problem(f"p{i}", f"Question number {i}?", str(i * 7)) for i in range(1, 6)]
ANSWERS = {p.id: (p.question, p.answer) for p in PROBLEMS}


def options(**kw) -> RunOptions:
    cfgs = configs.expand(["large-only", "glimpse", "small-only"], [0.5, 1.0])
    return RunOptions(configs=cfgs, problems=PROBLEMS, dataset_fingerprint="fp", models={"small": "a", "large": "b"},
                      calibrate_every=0, **kw)


def test_plan_interleaves_problems_and_rotates_configs():
    opts = options(repeats=2)
    tasks = plan(opts)
    n = len(opts.configs)
    assert len(tasks) == 2 * len(PROBLEMS) * n
    # Problem by problem: all configs of one problem before the next problem.
    assert [t.problem.id for t in tasks[:n]] == ["p1"] * n
    assert [t.problem.id for t in tasks[n:2 * n]] == ["p2"] * n
    firsts = [tasks[i * n].config.label for i in range(len(PROBLEMS))]
    assert len(set(firsts)) == min(n, len(PROBLEMS))  # each problem starts with another config
    assert len({t.key for t in tasks}) == len(tasks)


def test_same_seed_for_every_config_of_a_problem(tmp_path):
    fake = FakeRouter(ANSWERS)
    Runner(options(), ResultsFile(tmp_path / "r.jsonl"), fake, progress=False).run()
    by_problem: dict[str, set[int]] = {}
    for _, _, pid, seed in fake.calls:
        by_problem.setdefault(pid, set()).add(seed)
    assert all(len(s) == 1 for s in by_problem.values())
    assert len({next(iter(s)) for s in by_problem.values()}) == len(PROBLEMS)


def test_interrupt_then_resume_runs_each_problem_once(tmp_path):
    path = tmp_path / "results.jsonl"
    opts = options()
    total = len(plan(opts))
    first = FakeRouter(ANSWERS, interrupt_at=7)  # Ctrl-C during the 8th request
    with pytest.raises(KeyboardInterrupt):
        Runner(opts, ResultsFile(path), first, progress=False).run()
    assert len(first.calls) == 7
    assert len(ResultsFile(path).done_keys()) == 7

    second = FakeRouter(ANSWERS)
    outcome = Runner(opts, ResultsFile(path), second, progress=False).run()
    assert (outcome.total, outcome.done, outcome.ran) == (total, total, total - 7)
    # Nothing the first run finished was asked again, and together they asked everything once.
    assert not set(first.calls) & set(second.calls)
    assert len(set(first.calls) | set(second.calls)) == total
    keys = [(r["config"], r["problem"], r["repeat"]) for r in ResultsFile(path).of_kind("result")]
    assert len(keys) == len(set(keys)) == total

    third = FakeRouter(ANSWERS)  # a complete run: nothing left to do
    assert Runner(opts, ResultsFile(path), third, progress=False).run().ran == 0
    assert third.calls == []


def test_a_line_cut_by_a_kill_is_dropped_and_rerun(tmp_path):
    path = tmp_path / "results.jsonl"
    opts = options()
    with pytest.raises(KeyboardInterrupt):
        Runner(opts, ResultsFile(path), FakeRouter(ANSWERS, interrupt_at=3), progress=False).run()
    with open(path, "a") as f:
        f.write('{"kind":"result","config":"large-only","probl')  # killed mid-write
    rf = ResultsFile(path)
    assert len(rf.done_keys()) == 3
    assert path.read_text().endswith("\n")
    Runner(opts, rf, FakeRouter(ANSWERS), progress=False).run()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert sum(1 for r in lines if r["kind"] == "result") == len(plan(opts))


def test_resume_refuses_other_settings(tmp_path):
    path = tmp_path / "results.jsonl"
    rf = ResultsFile(path)
    rf.check_or_write_meta(options().meta())
    ResultsFile(path).check_or_write_meta(options().meta())  # same settings: fine
    with pytest.raises(ResumeMismatch, match="seed"):
        ResultsFile(path).check_or_write_meta(options(seed=5).meta())


def test_failed_requests_are_recorded_and_retried(tmp_path):
    import grpc

    class Flaky(FakeRouter):
        def reason(self, req, timeout_s):
            if len(self.calls) == 2 and not getattr(self, "failed", False):
                self.failed = True
                raise _RpcError()
            return super().reason(req, timeout_s)

    class _RpcError(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "worker went away"

    path = tmp_path / "results.jsonl"
    opts = options()
    out = Runner(opts, ResultsFile(path), Flaky(ANSWERS), progress=False).run()
    assert out.errors == 1 and out.done == out.total - 1
    out = Runner(opts, ResultsFile(path), FakeRouter(ANSWERS), progress=False).run()
    assert out.ran == 1 and out.done == out.total


def test_a_run_whose_requests_all_fail_stops_after_three(tmp_path):
    import grpc

    from evaluation.runner import RunAborted

    class Down(FakeRouter):
        def reason(self, req, timeout_s):
            self.calls.append(req.routing.policy)
            raise Unavailable()

    class Unavailable(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "connection refused"

    down = Down(ANSWERS)
    with pytest.raises(RunAborted, match="connection refused"):
        Runner(options(), ResultsFile(tmp_path / "r.jsonl"), down, progress=False).run()
    assert len(down.calls) == 3


def test_results_keep_each_steps_critical_prefill_and_catch_up(tmp_path):
    cfgs = configs.expand(["glimpse@0.9:catch_up=lazy", "glimpse@0.9:catch_up=eager", "large-only"], [])
    opts = RunOptions(configs=cfgs, problems=PROBLEMS[:1], dataset_fingerprint="fp", calibrate_every=0)
    fake = FakeRouter(ANSWERS)
    rf = ResultsFile(tmp_path / "r.jsonl")
    Runner(opts, rf, fake, progress=False).run()
    from services.router.api.types import CatchUp
    assert {r.catch_up for r in fake.routings} == {CatchUp.LAZY, CatchUp.EAGER, None}  # None: the router's default
    rec = next(r for r in rf.of_kind("result") if r["config"] == "glimpse@0.9:catch_up=lazy")
    # small, large, small: the prompt, then two switches of 10 tokens each
    assert [s["critical_prefill_tokens"] for s in rec["steps"]] == [40, 10, 10]
    assert [s["critical_prefill_ms"] for s in rec["steps"]] == [20.0, 5.0, 5.0]


def test_worker_usage_counts_catch_up_apart():
    from evaluation.stack import usage_delta

    def sample(prefilled, cached, caught_up, extend_s):
        name = "glimprouter_worker_prompt_tokens_total"
        return {(name, (("kind", "prefilled"), ("model", "m"))): prefilled,
                (name, (("kind", "cached"), ("model", "m"))): cached,
                (name, (("kind", "caught_up"), ("model", "m"))): caught_up,
                ("glimprouter_worker_request_duration_seconds_sum", (("method", "Extend"), ("model", "m"))): extend_s}

    d = usage_delta(sample(100, 500, 0, 0.0), sample(130, 900, 64, 0.25))
    assert (d["prefilled"], d["cached"], d["caught_up"], d["Extend_s"]) == (30, 400, 64, 0.25)
