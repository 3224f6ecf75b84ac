"""`glimprouter up`: the whole local stack as child processes of this one.

Order: Redis (the configured one, or a private redis-server) -> small worker ->
large worker -> router -> gateway; each is started with services.common.procs and
waited for (its ready line), then the gateway's /readyz says the router serves.
Ctrl-C or SIGTERM stops them in reverse order. Children run in their own sessions,
so a Ctrl-C in the terminal reaches only this process, which stops them in order;
a final sweep of /proc ends any child that a signal caught half-started.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TextIO

import grpc

from services.common import redis_local
from cli.ask import AskSettings, ask, describe_rpc_error
from cli.config import UpSettings
from cli.render import Style
from services.common import procs
from services.worker import models


class Stop(Exception):
    """A signal asked us to stop."""


def _raise_stop(signum, frame) -> None:
    raise Stop(signal.Signals(signum).name)


class Stack:
    def __init__(self, s: UpSettings, out: TextIO, style: Style) -> None:
        self.s, self.out, self.style = s, out, style
        self.services: list[procs.Service] = []
        self.redis: redis_local.PrivateRedis | None = None
        self.redis_url = s.redis_url
        self.gateway_url = ""
        self.router_address = ""
        self.metrics_urls: list[str] = []  # the router's and workers' Prometheus endpoints

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # ---- bring-up ----------------------------------------------------------------------
    def _model(self, name: str) -> tuple[Path, str]:
        path = models.ensure(name)  # progress bars on a terminal
        is_id = not Path(name).expanduser().is_file()
        return path, (name if is_id else "")

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> procs.Service:
        t0 = time.monotonic()
        svc = procs.start(name, args, env=env, timeout=self.s.start_timeout_s, echo=self.s.verbose)
        self.services.append(svc)
        self.say(f"  {name:<13} {svc.address:<21} pid {svc.proc.pid:<8} ready in {time.monotonic() - t0:.1f} s")
        return svc

    def up(self) -> None:
        s = self.s
        small_path, small_id = self._model(s.small_model)
        large_path, large_id = self._model(s.large_model)
        if not s.private_redis and redis_local.answers(s.redis_url):
            self.say(f"  {'redis':<13} {redis_local.safe_url(s.redis_url)} (already running)")
        else:
            self.redis = redis_local.start_private()
            self.redis_url = self.redis.url
            self.say(f"  {'redis':<13} 127.0.0.1:{self.redis.port:<11} pid {self.redis.pid:<8} private, in {self.redis.dir.name}")
        workers = []
        for role, path, model_id in (("small", small_path, small_id), ("large", large_path, large_id)):
            args = ["services.worker", "--backend", s.backend, "--model", str(path), "--host", s.host, "--port", "0",
                    "--context-length", str(s.context_length), "--threads", str(s.threads)]
            if model_id:
                args += ["--model-id", model_id]
            workers.append(self._start(f"{role} worker", args))
        # The Redis URL may hold a password: it goes by environment, not argv (ps shows argv).
        router = self._start(
            "router",
            ["services.router", "--host", s.host, "--port", str(s.router_port),
             "--small", workers[0].address, "--large", workers[1].address, "--catch-up", s.catch_up],
            env={"GLIMPROUTER_REDIS_URL": self.redis_url},
        )
        self.router_address = router.address
        for svc in (router, *workers):
            port = svc.ready_fields.get("metrics_port", "-1")
            if port.isdigit():
                self.metrics_urls.append(f"http://{s.host}:{port}/metrics")
        gateway = self._start("gateway", ["gateway", "--host", s.host, "--port", str(s.gateway_port),
                                          "--router", router.address])
        self.gateway_url = f"http://{gateway.address}"
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.gateway_url + "/readyz", timeout=3) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                last = exc.read().decode(errors="replace")
            except OSError as exc:
                last = str(exc)
            self.check_children()
            time.sleep(0.2)
        raise procs.ServiceFailed(f"the gateway never became ready: {last}")

    def check_children(self) -> None:
        for svc in self.services:
            if svc.proc.poll() is not None:
                tail = "\n".join(list(svc.log_tail)[-20:])
                raise procs.ServiceFailed(f"{svc.name} exited with {svc.proc.returncode}; last output:\n{tail}")
        if self.redis is not None and self.redis.proc.poll() is not None:
            raise procs.ServiceFailed(f"the private redis-server exited with {self.redis.proc.returncode}")

    def banner(self) -> None:
        st = self.style
        body = json.dumps({"model": "glimprouter", "messages": [{"role": "user", "content": "What is 12 * 7?"}]})
        self.say()
        self.say(st("GlimpRouter is up.", "bold"))
        self.say(f"  OpenAI-compatible API  {self.gateway_url}/v1   (docs/gateway.md)")
        self.say(f"  router (gRPC)          {self.router_address}")
        self.say(f"  health                 {self.gateway_url}/readyz   metrics {self.gateway_url}/metrics")
        if self.metrics_urls:
            self.say(f"  metrics (router, workers) {'  '.join(self.metrics_urls)}")
        otlp = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        self.say(f"  traces                 {'OTLP to ' + otlp if otlp else 'off (set OTEL_EXPORTER_OTLP_ENDPOINT)'}"
                 "   (docs/observability.md)")
        where = "private, stopped with the stack" if self.redis else "already running, left running"
        self.say(f"  redis                  {redis_local.safe_url(self.redis_url)} ({where})")
        self.say(st("Try:", "bold"))
        self.say(f"  curl -s {self.gateway_url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'")
        self.say(f"  glimprouter ask --router {self.router_address} \"What is 12 * 7?\"")
        self.say(st("Ctrl-C stops everything.", "dim"))

    def demo(self) -> None:
        self.say()
        self.say(self.style("Demo: ", "bold") + self.s.demo_question)
        settings = AskSettings(router=self.router_address, color=self.s.color, thinking_tokens=self.s.demo_thinking_tokens)
        try:
            asyncio.run(ask(self.s.demo_question, settings, self.out, self.style))
        except grpc.RpcError as exc:
            self.say(self.style(f"the demo question failed: {describe_rpc_error(exc, self.router_address)}", "red"))

    # ---- teardown ----------------------------------------------------------------------
    def down(self) -> None:
        for svc in reversed(self.services):
            code = svc.stop()
            if self.s.verbose:
                self.say(f"  stopped {svc.name} (exit {code})")
        self.services.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        left = sweep_children()
        if left:
            self.say(f"  stopped {len(left)} half-started process(es): pid {', '.join(map(str, left))}")


def _children(pid: int) -> list[int]:
    """Direct children of `pid` still running (Linux /proc; nothing elsewhere)."""
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        # Fields after the command name, which may itself hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(name))
    return out


def sweep_children(grace: float = 10.0) -> list[int]:
    """End any child a signal caught between its spawn and procs.start returning it."""
    left = _children(os.getpid())
    for pid in left:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    pending = set(left)
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                pending.discard(pid)
        time.sleep(0.05)
    for pid in pending:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    return left


def run(s: UpSettings, out: TextIO = sys.stdout) -> int:
    style = Style.for_stream(out, s.color)
    stack = Stack(s, out, style)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    code = 0
    try:
        stack.say(style("Starting GlimpRouter", "bold") + f" (small {s.small_model}, large {s.large_model}, {s.backend})")
        stack.up()
        stack.banner()
        if s.demo:
            stack.demo()
            stack.say(style("Still serving; Ctrl-C stops everything.", "dim"))
        while True:
            stack.check_children()
            time.sleep(0.5)
    except Stop as why:
        stack.say(f"\n{why}: stopping")
    except KeyboardInterrupt:
        stack.say("\nstopping")
    except (procs.ServiceFailed, models.ModelError, RuntimeError) as exc:
        stack.say(style(f"error: {exc}", "red"))
        code = 1
    finally:
        # A second Ctrl-C must not cut the teardown short and leave orphans.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        stack.down()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stack.say("stopped")
    return code
