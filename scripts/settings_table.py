"""Write the configuration tables into README.md from the settings dataclasses, so
the docs cannot drift from the code; `--check` fails when README.md is stale."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BEGIN, END = "<!-- settings-table:begin -->", "<!-- settings-table:end -->"

# (heading, module, class): every service's settings, in the order of the diagram.
SETTINGS = [
    ("Gateway (`glimprouter-gateway`)", "gateway.config", "GatewaySettings"),
    ("Router (`glimprouter-router`)", "services.router.config", "RouterSettings"),
    ("Worker (`glimprouter-worker`)", "services.worker.config", "WorkerSettings"),
    ("Local stack (`glimprouter up`)", "cli.config", "UpSettings"),
]


def table(cls: type) -> str:
    from services.common.settings import env_name, flag_name

    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = f.default
        if isinstance(default, (tuple, list)):
            default = ",".join(map(str, default))
        shown = "(secret)" if f.metadata.get("secret") else f"`{default}`" if default != "" else "(empty)"
        rows.append(f"| `{flag_name(f.name)}` | `{env_name(f.name)}` | {shown} | {f.metadata.get('help', '')} |")
    return "\n".join(rows)


def render() -> str:
    parts = []
    for heading, module, name in SETTINGS:
        cls = getattr(importlib.import_module(module), name)
        parts.append(f"### {heading}\n\n{table(cls)}\n")
    return "\n".join(parts)


def updated(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{render()}{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = README.read_text()
    new = updated(text)
    if args.check:
        if new != text:
            print("README.md configuration tables are stale: run `python scripts/settings_table.py`", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
