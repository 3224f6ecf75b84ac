"""docs/benchmarks.md is assembled from sections, one per benchmark, each replaced
in place by the benchmark that owns it so re-running one keeps the others."""
from __future__ import annotations

import datetime
import os
import pathlib
import platform

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Measured on this project's development machines (2 CPU cores, no GPU) with the
llama.cpp backend. Each section says the command that reproduces it; re-running a
command rewrites only its own section. Numbers drift between runs on shared
machines: compare the figures inside one section, which were measured side by side.
"""


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_section(name: str, body: str) -> pathlib.Path:
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = f"{begin}\n{body.rstrip()}\n\n_Measured {stamp} on {machine()}._\n{end}"
    text = DOC.read_text() if DOC.exists() else HEADER
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
    return DOC
