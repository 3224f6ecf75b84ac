"""Stack layouts: where the workers run and with which flags, and the command prefix
(pinning) that services.common.procs puts in front of a service."""
from __future__ import annotations

import shutil
import sys
import textwrap

import pytest

from evaluation import stack
from evaluation.stack import SimPair, StackError, StackOptions
from services.common import procs


def command(role: str, opts: StackOptions) -> tuple[list[str], list[str]]:
    return stack._worker_command(role, "sim-x" if opts.layout == "sim" else "smollm2-135m", opts)


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.fixture
def two_cpus(monkeypatch):
    monkeypatch.setattr(stack.os, "sched_getaffinity", lambda pid: {3, 5, 7})
    monkeypatch.setattr(stack.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(stack.models, "resolve", lambda model: f"/models/{model}.gguf")


def test_default_layout_runs_the_workers_unpinned_on_every_core(two_cpus):
    for role in ("small", "large"):
        prefix, args = command(role, StackOptions())
        assert prefix == [] and flag(args, "--threads") == "0"


def test_pinned_layout_puts_each_worker_on_its_own_cpu_with_one_thread(two_cpus):
    opts = StackOptions(layout="pinned", threads=0)
    (sp, sa), (lp, la) = command("small", opts), command("large", opts)
    assert (sp, lp) == (["taskset", "-c", "3"], ["taskset", "-c", "5"])  # the first two CPUs we may use
    assert flag(sa, "--threads") == flag(la, "--threads") == "1"


def test_pinned_layout_refuses_one_cpu_before_starting_anything(monkeypatch, two_cpus):
    monkeypatch.setattr(stack.os, "sched_getaffinity", lambda pid: {0})
    started = []
    monkeypatch.setattr(stack.procs, "start", lambda *a, **k: started.append(a))
    monkeypatch.setattr(stack, "_private_redis", lambda s: started.append("redis") or "redis://x")
    with pytest.raises(StackError, match="needs 2 CPUs"):
        stack.start(StackOptions(layout="pinned"))
    assert started == []


def test_pinned_layout_needs_taskset(monkeypatch, two_cpus):
    monkeypatch.setattr(stack.shutil, "which", lambda name: None)
    with pytest.raises(StackError, match="taskset"):
        command("small", StackOptions(layout="pinned"))


def test_sim_layout_models_the_gpu_pair(two_cpus):
    opts = StackOptions(layout="sim")
    (sp, sa), (lp, la) = command("small", opts), command("large", opts)
    assert sp == lp == [] and flag(sa, "--backend") == flag(la, "--backend") == "sim"
    # Qwen3-4B and Qwen3-32B at batch 1 on one GPU each: ~7.5 and ~48 ms per decoded token.
    assert float(flag(sa, "--sim-token-latency-s")) == pytest.approx(0.0075, rel=0.01)
    assert float(flag(la, "--sim-token-latency-s")) == pytest.approx(0.0483, rel=0.01)
    assert float(flag(sa, "--sim-prefill-latency-s")) < float(flag(la, "--sim-prefill-latency-s"))
    # Both follow one script: the same steps, step length, hard steps.
    for name in ("--sim-step-tokens", "--sim-steps", "--sim-hard-fraction", "--sim-seed"):
        assert flag(sa, name) == flag(la, name)


def test_sim_pair_hard_steps_give_a_real_runs_intervention_rate():
    from services.worker.backends.sim import SimModel

    pair = SimPair()
    model = SimModel(seed=pair.seed, hard_fraction=pair.hard_fraction)
    hard = sum(model.is_hard(s) for s in range(pair.steps))
    assert 0.25 <= hard / (pair.steps + 1) <= 0.40  # + the </think> step, always easy


def test_unknown_layout():
    with pytest.raises(StackError, match="unknown layout"):
        command("small", StackOptions(layout="gpu"))


# ---- services.common.procs: a command prefix ---------------------------------------------------
PROBE = textwrap.dedent("""
    import os, sys, time
    print(f"probe ready port=1 cpus={','.join(map(str, sorted(os.sched_getaffinity(0))))} "
          f"marker={os.environ.get('PROBE_MARK', 'none')}", flush=True)
    time.sleep(60)
""")


def test_procs_start_runs_the_service_under_a_prefix(tmp_path):
    (tmp_path / "affinity_probe.py").write_text(PROBE)
    env = {"PYTHONPATH": str(tmp_path)}
    svc = procs.start("probe", ["affinity_probe"], env=env, timeout=30, prefix=["env", "PROBE_MARK=prefixed"])
    try:
        assert svc.ready_fields["marker"] == "prefixed"
    finally:
        assert svc.stop() is not None
    plain = procs.start("probe", ["affinity_probe"], env=env, timeout=30)
    try:
        assert plain.ready_fields["marker"] == "none"
    finally:
        plain.stop()


@pytest.mark.skipif(shutil.which("taskset") is None or not sys.platform.startswith("linux"), reason="needs taskset")
def test_procs_start_pins_with_taskset(tmp_path):
    (tmp_path / "affinity_probe.py").write_text(PROBE)
    cpu = stack.pinned_cpus()[1] if len(stack.os.sched_getaffinity(0)) >= 2 else min(stack.os.sched_getaffinity(0))
    svc = procs.start("probe", ["affinity_probe"], env={"PYTHONPATH": str(tmp_path)}, timeout=30,
                      prefix=["taskset", "-c", str(cpu)])
    try:
        assert svc.ready_fields["cpus"] == str(cpu)
        # taskset execs the service: the process procs stops is the service itself.
        assert svc.stop() is not None and svc.proc.poll() is not None
    finally:
        svc.kill()


def test_cpu_layouts_catch_up_in_small_chunks():
    from evaluation.stack import CPU_CATCH_UP_TOKENS, StackOptions, router_args

    assert router_args(StackOptions(layout="pinned")) == ["--catch-up-tokens", str(CPU_CATCH_UP_TOKENS)]
    assert router_args(StackOptions(layout="default")) == ["--catch-up-tokens", str(CPU_CATCH_UP_TOKENS)]
    assert router_args(StackOptions(layout="sim")) == []  # the router's default, as on GPU workers
