"""`glimprouter up` in a subprocess, on SmolLM2 for both roles: every service comes up
healthy, the demo runs, requests succeed (gateway, `ask`, `session show`), and
SIGINT leaves no process behind - also when it arrives halfway through start-up."""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow


def _marked(marker: str) -> list[int]:
    """Live processes whose environment carries the marker: everything `up` started."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if marker.encode() in (d / "environ").read_bytes():
                found.append(int(d.name))
        except OSError:
            continue
    return found


class Up:
    def __init__(self, model: Path, *extra: str) -> None:
        self.marker = f"GLIMPROUTER_TEST_MARKER={uuid.uuid4().hex}"
        # Models by environment, the rest by flags: both ways of setting must work.
        env = {**os.environ, "GLIMPROUTER_TEST_MARKER": self.marker.split("=", 1)[1],
               "GLIMPROUTER_SMALL_MODEL": str(model), "GLIMPROUTER_LARGE_MODEL": str(model)}
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "cli", "up", "--gateway-port", "0", "--router-port", "0", "--private-redis",
             "--threads", "1", "--context-length", "2048", "--color", "never", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 240) -> re.Match:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        for line in self.lines:
            if m := rx.search(line):
                return m
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self._q.empty():
                    break
                continue
            self.lines.append(line)
            if m := rx.search(line):
                return m
        raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines))

    def pids(self) -> list[int]:
        return [int(p) for line in self.lines for p in re.findall(r"\bpid (\d+)", line)]

    def interrupt(self, timeout: float = 90) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout)
        time.sleep(0.2)
        while not self._q.empty():
            self.lines.append(self._q.get())
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in _marked(self.marker):
            os.kill(pid, signal.SIGKILL)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=timeout)


def test_up_serves_then_sigint_stops_everything(smollm2_path):
    up = Up(smollm2_path, "--demo", "--demo-thinking-tokens", "40")
    try:
        gw = up.wait_for(r"OpenAI-compatible API\s+(http://\S+)/v1").group(1)
        router = up.wait_for(r"router \(gRPC\)\s+(\S+)").group(1)
        up.wait_for(r"Still serving")
        out = "\n".join(up.lines)
        # redis, two workers, router, gateway
        pids = up.pids()
        assert len(pids) == 5, out
        assert all(not _gone(p) for p in pids)
        # The demo: steps marked with their model and entropy, then the answer and a summary.
        assert re.search(r"^\[\s*0\] (small|LARGE) H=\d+\.\d\d", out, re.M), out
        assert re.search(r"^── .* steps: \d+ small, \d+ large · intervention rate \d+%", out, re.M), out
        assert "curl -s " + gw + "/v1/chat/completions" in out

        assert httpx.get(gw + "/readyz").status_code == 200
        client = openai.OpenAI(base_url=gw + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="glimprouter", messages=[{"role": "user", "content": "Say hi."}],
                                           extra_body={"budgets": {"max_steps": 2, "step_tokens": 16}})
        assert r.choices[0].message.content and r.glimprouter["steps"]["total"] >= 1

        asked = _cli("ask", "--router", router, "--max-steps", "2", "--step-tokens", "16", "--color", "never",
                     "What is 2 + 2?")
        assert asked.returncode == 0, asked.stderr
        sid = re.search(r"^session (\w+)", asked.stdout, re.M).group(1)
        assert re.search(r"^\[\s*0\] (small|LARGE) H=", asked.stdout, re.M) and "intervention rate" in asked.stdout
        shown = _cli("session", "show", sid, "--router", router, "--color", "never")
        assert shown.returncode == 0, shown.stderr
        assert re.search(r"#\s+turn\s+model\s+entropy\s+tau\s+decision\s+tokens\s+latency ms", shown.stdout)
        assert re.search(r"^\s+0\s+0\s+(small|large)\s", shown.stdout, re.M), shown.stdout
        missing = _cli("session", "show", "no-such-session", "--router", router)
        assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr

        assert up.interrupt() == 0, "\n".join(up.lines)
        assert up.lines[-1] == "stopped"
        assert [p for p in pids if not _gone(p)] == []
        assert _marked(up.marker) == []
    finally:
        up.kill()


@pytest.mark.parametrize("delay", [0.0, 0.4])
def test_sigint_during_startup_leaves_no_orphan(smollm2_path, delay):
    up = Up(smollm2_path)
    try:
        up.wait_for(r"small worker .* pid \d+")
        # The large worker is being spawned or loading: procs.start has not returned it yet.
        time.sleep(delay)
        assert up.interrupt() == 0, "\n".join(up.lines)
        assert _marked(up.marker) == [], "\n".join(up.lines)
        assert all(_gone(p) for p in up.pids())
    finally:
        up.kill()
