"""The run's output file: JSON lines, appended one record at a time.

Every finished problem is one line written and flushed to disk before the next
starts, so an interrupted run loses at most the problem in flight, and a rerun
reads the file to skip what is done. Kinds of line:

    meta         the run's settings (a rerun must match them to resume)
    result       one (config, problem, repeat): answer, grade, latency, stats, steps
    error        a request that failed; not counted as done, so a rerun retries it
    calibration  each model's measured decode speed at some point of the run
    step_check   one step of the step-level analysis
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

# Settings that change what a result means: resuming under others would mix runs.
MATCHED = ("dataset_fingerprint", "seed", "budgets", "sampling", "prompt_template", "models")


class ResumeMismatch(Exception):
    pass


def key(rec: dict) -> tuple[str, str, int]:
    return rec["config"], rec["problem"], int(rec["repeat"])


class ResultsFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: list[dict] = []
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        # A line cut short by a kill is dropped (and cut off the file) so appends
        # start on a line boundary.
        end = raw.rfind(b"\n") + 1
        if end < len(raw):
            with open(self.path, "r+b") as f:
                f.truncate(end)
        for n, line in enumerate(raw[:end].decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                self.records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ResumeMismatch(f"{self.path}:{n} is not JSON ({exc.msg}); move the file away to start over") from None

    def append(self, rec: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, separators=(",", ":"), allow_nan=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(rec)

    def of_kind(self, kind: str) -> Iterator[dict]:
        return (r for r in self.records if r.get("kind") == kind)

    @property
    def meta(self) -> dict | None:
        return next(self.of_kind("meta"), None)

    def done_keys(self) -> set[tuple[str, str, int]]:
        return {key(r) for r in self.of_kind("result")}

    def check_or_write_meta(self, meta: dict) -> None:
        """Start the file with `meta`, or check that an existing run used the same settings."""
        old = self.meta
        if old is None:
            self.append(meta)
            return
        diff = [k for k in MATCHED if old.get(k) != meta.get(k)]
        if diff:
            lines = [f"  {k}: file has {old.get(k)!r}, this run has {meta.get(k)!r}" for k in diff]
            raise ResumeMismatch(
                f"{self.path} holds a run with other settings:\n" + "\n".join(lines)
                + "\nuse another --out directory, or --fresh to start this one over"
            )
