"""Print the runtime requirements of the glimprouter package, one per line, from
pyproject.toml: the images install their dependencies from this list (a cached
layer), then the package itself with --no-deps. pyproject.toml stays the one place
that names the dependencies.

    python docker/requirements.py                          # CPU worker
    python docker/requirements.py --exclude llama-cpp-python   # router, gateway
    python docker/requirements.py --extra trtllm --exclude llama-cpp-python
"""
from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not m:
        raise ValueError(f"cannot read a package name from {req!r}")
    return canonical(m.group(1))


def requirements(pyproject: Path = PYPROJECT, extras: list[str] = (), exclude: list[str] = ()) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise KeyError(f"pyproject.toml has no extra {extra!r} (it has: {', '.join(optional)})")
        reqs += optional[extra]
    dropped = {canonical(n) for n in exclude}
    unknown = dropped - {requirement_name(r) for r in reqs}
    if unknown:
        raise KeyError(f"not a requirement, cannot exclude: {', '.join(sorted(unknown))}")
    return [r for r in reqs if requirement_name(r) not in dropped]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extra", action="append", default=[], help="add an optional-dependencies group")
    ap.add_argument("--exclude", action="append", default=[], help="leave a package out")
    ap.add_argument("--pyproject", type=Path, default=PYPROJECT)
    args = ap.parse_args(argv)
    try:
        for req in requirements(args.pyproject, args.extra, args.exclude):
            print(req)
    except (KeyError, ValueError) as exc:
        print(f"requirements.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
