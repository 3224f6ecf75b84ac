"""Datasets: JSONL files of `{"question": ..., "answer": ...}`, one problem a line.

An `id` field is optional (the line number is used otherwise); other fields are
kept but ignored. The shipped sample set is `evaluation/data/sample.jsonl`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

SAMPLE = Path(__file__).with_name("data") / "sample.jsonl"


class DatasetError(ValueError):
    pass


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str


def load(path: str | Path) -> list[Problem]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset {path} does not exist")
    problems: list[Problem] = []
    seen: set[str] = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or "question" not in row or "answer" not in row:
            raise DatasetError(f'{path}:{n}: each line needs "question" and "answer"')
        pid = str(row.get("id", n))
        if pid in seen:
            raise DatasetError(f"{path}:{n}: duplicate id {pid!r}")
        seen.add(pid)
        problems.append(Problem(pid, str(row["question"]).strip(), str(row["answer"]).strip()))
    if not problems:
        raise DatasetError(f"{path} holds no problems")
    return problems


def fingerprint(problems: list[Problem]) -> str:
    """Identifies the problem set, so a resumed run can tell it is the same one."""
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.id, p.question, p.answer]).encode())
    return h.hexdigest()[:16]
