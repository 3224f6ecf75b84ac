"""Starting service processes and waiting until they say they are ready.

Every service prints one line `<name> ready ... port=N` once it serves; the CLI's
`up` and the tests start services as child processes and wait for that line, so
`--port 0` (a free port picked by the OS) works everywhere.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

_READY = re.compile(r"\bready\b.*\bport=(\d+)")
_FIELD = re.compile(r"(\w+)=(\S+)")


class ServiceFailed(RuntimeError):
    pass


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    port: int = 0
    # key=value pairs of the ready line (model=..., metrics_port=...).
    ready_fields: dict = field(default_factory=dict)
    log_tail: deque = field(default_factory=lambda: deque(maxlen=200))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start(
    name: str,
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
    echo: bool = False,
    prefix: Sequence[str] = (),
) -> Service:
    """Run `python -m <args>` and wait for its ready line; raise with its last output if it dies.
    `prefix`: a command that runs it, e.g. ("taskset", "-c", "0") to pin it to a CPU."""
    cmd = [*prefix, sys.executable, "-u", "-m", *args]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # Ctrl-C in a terminal reaches the parent, which stops children in order
    )
    svc = Service(name, proc)
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            svc.log_tail.append(line.rstrip())
            if echo:
                print(f"[{name}] {line}", end="", flush=True)
            m = _READY.search(line)
            if m and not ready.is_set():
                svc.port = int(m.group(1))
                svc.ready_fields = dict(_FIELD.findall(line))
                ready.set()

    threading.Thread(target=pump, name=f"log-{name}", daemon=True).start()
    deadline = time.monotonic() + timeout
    try:
        while not ready.wait(0.1):
            if proc.poll() is not None or time.monotonic() > deadline:
                svc.kill()
                tail = "\n".join(list(svc.log_tail)[-30:])
                why = f"exited with {proc.returncode}" if proc.returncode is not None else f"not ready in {timeout:.0f}s"
                raise ServiceFailed(f"{name} {why}; last output:\n{tail}")
    except BaseException:
        # Ctrl-C (or any error) while waiting: the caller never gets this Service to
        # stop, so it must not outlive this call.
        svc.kill()
        raise
    return svc
