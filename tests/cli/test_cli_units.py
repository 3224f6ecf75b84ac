"""The CLI's pieces without a stack: rendering, request building, settings and
--help, the orphan sweep, the private Redis."""
from __future__ import annotations

import io
import math
import os
import subprocess
import sys

import pytest

from services.common import redis_local
from cli.__main__ import _parser, main
from cli.ask import AskSettings, Printer, build_request, parse_params
from cli.render import Style, session_table, step_block, summary_line
from services.router.api import (
    AnswerDelta, Budgets, Decision, Done, PrefixMode, Role, RoleStats, SessionInfo, Started, Stats, Step, StepDelta,
    StepStart,
)
from services.common import settings as settings_mod
from cli.config import UpSettings

PLAIN = Style(False)


def test_step_block_marks_model_and_entropy():
    s = Step(3, role=Role.LARGE, decision=Decision.LARGE, entropy=1.234, threshold=0.9, text="Wait.\nCheck again.\n\n")
    assert step_block(s, PLAIN) == "[  3] LARGE H=1.23 >= 0.90  Wait.\n" + " " * 27 + " Check again."
    s = Step(0, role=Role.SMALL, decision=Decision.SMALL, entropy=0.1, threshold=0.9, text="Easy.")
    assert step_block(s, PLAIN).startswith("[  0] small H=0.10 <  0.90 ")
    nan = Step(1, role=Role.LARGE, decision=Decision.LARGE, entropy=math.nan, threshold=math.nan, text="x")
    assert "H=- " in step_block(nan, PLAIN)


def test_colour_only_when_asked_or_on_a_tty(monkeypatch):
    assert Style.for_stream(io.StringIO()).enabled is False
    assert Style.for_stream(io.StringIO(), "always").enabled is True
    assert "\x1b[" in step_block(Step(0, role=Role.SMALL, text="a"), Style(True))

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert Style.for_stream(Tty()).enabled is True
    monkeypatch.setenv("NO_COLOR", "1")
    assert Style.for_stream(Tty()).enabled is False


def _stats():
    return Stats(steps=4, intervention_rate=0.25, small=RoleStats(steps=3), large=RoleStats(steps=1),
                 thinking_tokens=50, answer_tokens=10, thinking_end="think_end", answer_end="eos")


def test_summary_line():
    line = summary_line(_stats(), 2.345, PLAIN)
    assert line == ("── 2.3 s · 4 steps: 3 small, 1 large · intervention rate 25% · tokens: 50 steps + 10 answer"
                    " · ended: think_end, answer eos")


def test_printer_streams_steps_token_by_token_answer_and_summary():
    out = io.StringIO()
    p = Printer(out, PLAIN)
    head = StepStart(0, role=Role.SMALL, decision=Decision.SMALL, entropy=0.2, threshold=0.9)
    p.event(Started("abc", 0, PrefixMode.TOKENS, 0, "S", "L"))
    p.event(head)
    # The step's marker is out before any of its text: who writes it and why.
    assert out.getvalue().endswith("[  0] small H=0.20 <  0.90  ")
    for ev in (StepDelta(0, "One"), StepDelta(0, ".\nTwo"), StepDelta(0, ".\n\n"),
               Step(0, role=Role.SMALL, decision=Decision.SMALL, entropy=0.2, threshold=0.9, text="One.\nTwo.\n\n"),
               AnswerDelta("\n\nIt is", Role.LARGE), AnswerDelta(" 4.", Role.LARGE), Done("abc", "It is 4.", _stats())):
        p.event(ev)
    text = out.getvalue()
    assert text.startswith("session abc (turn 0)  small S · large L\n[  0] small H=0.20 <  0.90  One.\n" + " " * 28
                           + "Two.\nanswer\nIt is 4.\n── ")
    # A step cut by a worker fault starts again: the restart is shown.
    out = io.StringIO()
    p = Printer(out, PLAIN)
    for ev in (head, StepDelta(0, "On"), StepStart(0, role=Role.SMALL, decision=Decision.SMALL, attempt=2), StepDelta(0, "One.")):
        p.event(ev)
    assert "(restarted: attempt 2)\n[  0] small" in out.getvalue() and out.getvalue().endswith("One.")
    # No answer phase: the router's answer is shown once, labelled.
    out = io.StringIO()
    p = Printer(out, PLAIN)
    p.event(Done("abc", "One.", _stats()))
    assert "answer (the steps above)\nOne.\n" in out.getvalue()
    out = io.StringIO()
    Printer(out, PLAIN).event(Done("abc", r"So \[ \boxed{72} \]", _stats()))
    assert out.getvalue().startswith("answer 72  (\\boxed in the steps above)\n")


def test_session_table():
    info = SessionInfo("abc", status="done", turn=1, small_model="S", large_model="L", answer="4", stats=_stats(),
                       steps=[Step(0, 0, Role.SMALL, "S", Decision.SMALL, 0.123, 0.9, "a", 5, latency_ms=12.5),
                              Step(1, 1, Role.LARGE, "L", Decision.LARGE, 2.0, 0.9, "b", 7, latency_ms=40.0)])
    t = session_table(info, PLAIN)
    lines = t.splitlines()
    assert lines[0] == "session abc  status done · turn 1 · prefix "
    assert lines[3].split() == ["#", "turn", "model", "entropy", "tau", "decision", "tokens", "latency", "ms", "model", "id"]
    assert lines[5].split() == ["0", "0", "small", "0.123", "0.90", "small", "5", "12.5", "S"]
    assert lines[6].split() == ["1", "1", "large", "2.000", "0.90", "large", "7", "40.0", "L"]
    assert "2 steps: 1 small, 1 large · intervention rate 50%" in t and t.endswith("answer\n4")


def test_build_request_from_flags():
    ns = _parser().parse_args(["ask", "q?", "--policy", "random", "--params", "p=0.3", "--threshold", "1.5",
                               "--max-steps", "4", "--temperature", "0", "--session", "s1"])
    s = settings_mod.from_namespace(AskSettings, ns, environ={})
    req = build_request("q?", s)
    assert [(m.role, m.content) for m in req.messages] == [("user", "q?")] and req.session_id == "s1"
    assert (req.routing.policy, req.routing.threshold, req.routing.params) == ("random", 1.5, {"p": 0.3})
    assert req.budgets == Budgets(max_steps=4) and req.sampling.temperature == 0.0 and req.sampling.seed is None
    assert parse_params(["a=1", "b=2.5"]) == {"a": 1.0, "b": 2.5}
    with pytest.raises(SystemExit):
        parse_params(["a"])


def test_flags_and_env_share_names():
    ns = _parser().parse_args(["up", "--demo"])
    s = settings_mod.from_namespace(UpSettings, ns, environ={"GLIMPROUTER_SMALL_MODEL": "m.gguf", "GLIMPROUTER_DEMO": "false"})
    assert s.demo is True and s.small_model == "m.gguf"  # a flag wins over the environment
    s = settings_mod.from_namespace(UpSettings, _parser().parse_args(["up"]), environ={"GLIMPROUTER_DEMO": "1"})
    assert s.demo is True and s.gateway_port == 8080


@pytest.mark.parametrize("args", [[], ["up"], ["ask"], ["session", "show"], ["models", "fetch"]])
def test_help_everywhere(args, capsys):
    with pytest.raises(SystemExit) as e:
        main([*args, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: glimprouter")
    if args[:1] in (["up"], ["ask"]):
        assert "GLIMPROUTER_" in out


def test_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "glimprouter")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "glimprouter up" in r.stdout


def test_ask_without_router_says_so():
    r = subprocess.run([sys.executable, "-m", "cli", "ask", "--router", "127.0.0.1:1", "--timeout-s", "5", "hi"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "not reachable" in r.stderr


SWEEP = """
import os, subprocess, sys, time
from cli.up import _children, sweep_children
p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
assert p.pid in _children(os.getpid())
t0 = time.monotonic()
assert sweep_children() == [p.pid]
assert time.monotonic() - t0 < 10 and _children(os.getpid()) == []
print("swept", p.pid)
"""


def test_sweep_ends_children_it_was_not_told_about():
    # In a process of its own: a sweep here would also end this test session's services.
    r = subprocess.run([sys.executable, "-c", SWEEP], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("swept"), r.stderr
    pid = int(r.stdout.split()[1])
    assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1][:3]


def test_private_redis_starts_and_stops():
    r = redis_local.start_private()
    try:
        assert redis_local.answers(r.url)
    finally:
        r.stop()
    assert r.proc.poll() is not None and not os.path.exists(r.dir.name)
    assert not redis_local.answers(r.url, 0.2)


def test_redis_url_is_printed_without_its_password():
    assert redis_local.safe_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redis_local.safe_url("rediss://app:s3cret@redis.internal:6380/2") == "rediss://app:***@redis.internal:6380/2"
    assert redis_local.safe_url("redis://:s3cret@h:1/0") == "redis://:***@h:1/0"


def test_models_list_delegates(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-coder-0.5b" in out and "smollm2-135m" in out
