"""py-spy on a running service: record while a benchmark drives it, then the top costs.

`Recording(pid, path)` runs `py-spy record --format raw` (collapsed stacks) against
the process until stopped; `top(path)` reads them back as the functions that hold
the most samples, by self time (the innermost Python frame: work done in it, or in
the C code it called, such as grpc's Cython layer or hiredis) and by inclusive time
(samples with the function anywhere on the stack). Only samples of the thread
holding the GIL are kept (`--gil`): so grpcio's poller thread, blocked in C, and
the event loop waiting in epoll are not counted as work, and shares are of the
time the process ran Python (or C code called with the GIL held, such as grpcio's
Cython layer writing a message).
"""
from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Recording:
    def __init__(self, pid: int, path: Path, rate: int = 200, native: bool = False) -> None:
        exe = py_spy()
        if exe is None:
            raise SystemExit("--profile needs py-spy (pip install py-spy)")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # --nonblocking: read the target's memory without pausing it, so the profile
        # disturbs the measured process as little as possible.
        self.proc = subprocess.Popen(
            # (--native needs the process paused while its stack is read; --gil: the thread
            # holding the GIL only.)
            [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--output", str(path),
             *(["--native", "--gil"] if native else ["--nonblocking", "--gil"])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def stop(self) -> Path:
        self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return self.path


def _frame(frame: str) -> str:
    # "name (path/to/file.py:123)" -> "name (file.py)": lines vary inside a function.
    name, _, where = frame.partition(" (")
    file = os.path.basename(where.rsplit(":", 1)[0]) if where else ""
    return f"{name} ({file})" if file else name


def read(path: Path) -> tuple[collections.Counter, collections.Counter, int]:
    self_c: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";")]
        total += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return self_c, incl, total


def top(path: Path, n: int = 12) -> dict:
    self_c, incl, total = read(path)
    return {
        "samples": total,
        "self": [(f, c / total) for f, c in self_c.most_common(n)] if total else [],
        "inclusive": [(f, c / total) for f, c in incl.most_common(n + 8)] if total else [],
    }


def table(result: dict, n: int = 12) -> str:
    rows = ["| self % | function (innermost Python frame) |", "|---:|---|"]
    rows += [f"| {share * 100:.1f} | `{f}` |" for f, share in result["self"][:n]]
    return "\n".join(rows)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        r = top(Path(arg), 25)
        print(f"{arg}: {r['samples']} samples")
        print(table(r, 25))
        print("\ninclusive:")
        for f, share in r["inclusive"]:
            print(f"  {share * 100:5.1f}  {f}")
