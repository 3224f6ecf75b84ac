"""Redis helpers for local runs: whether a URL answers, a printable URL, and a private
`redis-server` on a free port in a temporary directory (for `glimprouter up`, the
benchmarks, the evaluation stack and the tests), owned and stopped by its caller."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import redis


def safe_url(url: str) -> str:
    """The URL as it may be printed: any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


def answers(url: str, timeout: float = 1.0) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class PrivateRedis:
    proc: subprocess.Popen
    port: int
    dir: tempfile.TemporaryDirectory

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.dir.cleanup()


def start_private(timeout: float = 10.0) -> PrivateRedis:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("no Redis answers at the configured URL and redis-server is not installed "
                           "(install it, e.g. `apt-get install redis-server`, or pass --redis-url)")
    tmp = tempfile.TemporaryDirectory(prefix="glimprouter-redis-")
    port = free_port()
    # Sessions are working state: no snapshots, no append-only file, local only.
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp.name,
           "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
           "--logfile", os.path.join(tmp.name, "redis.log")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    r = PrivateRedis(proc, port, tmp)
    deadline = time.monotonic() + timeout
    while not answers(r.url, 0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            try:
                err = open(os.path.join(tmp.name, "redis.log")).read()
            except OSError:
                err = ""
            r.stop()
            raise RuntimeError(f"redis-server did not start on port {port}: {err.strip()[-500:]}")
        time.sleep(0.05)
    return r
