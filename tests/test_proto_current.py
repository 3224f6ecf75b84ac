"""The committed generated stubs must match protos/: `make proto` regenerates them."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_generated_stubs_are_current():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_check_detects_a_stale_stub(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    out = tmp_path / "genproto"
    out.mkdir()
    gen.generate(out)
    stale = next(out.rglob("worker_pb2.py"))
    stale.write_text(stale.read_text() + "\n# edited by hand\n")
    monkeypatch.setattr(gen, "OUT", out)
    monkeypatch.setattr(sys, "argv", ["gen_proto.py", "--check"])
    assert gen.main() == 1
