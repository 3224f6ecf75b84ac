"""One place for configuration: flags and environment variables with the same names."""
from __future__ import annotations

import pathlib
import subprocess
import sys
from dataclasses import dataclass

import pytest

from services.common import settings as st

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclass
class Example:
    port: int = st.setting(1, "a port")
    name: str = st.setting("x", "a name", choices=["x", "y"])
    ratio: float = st.setting(0.5, "a ratio")
    on: bool = st.setting(False, "a switch")
    endpoints: tuple[str, ...] = st.setting(("a:1",), "a list")
    token: str = st.setting("", "a secret", secret=True)


def test_flag_wins_over_env_wins_over_default(monkeypatch):
    monkeypatch.setenv("GLIMPROUTER_PORT", "7")
    monkeypatch.setenv("GLIMPROUTER_ON", "yes")
    monkeypatch.setenv("GLIMPROUTER_ENDPOINTS", "h1:1, h2:2")
    s = st.load(Example, ["--port", "9", "--ratio", "0.25"])
    assert (s.port, s.ratio, s.on, s.endpoints) == (9, 0.25, True, ["h1:1", "h2:2"])
    assert st.load(Example, []).port == 7
    monkeypatch.delenv("GLIMPROUTER_PORT")
    assert st.load(Example, []).port == 1


@pytest.mark.parametrize(
    "env,value,message",
    [("GLIMPROUTER_PORT", "eighty", "GLIMPROUTER_PORT"), ("GLIMPROUTER_NAME", "z", "choose from x, y"), ("GLIMPROUTER_ON", "maybe", "GLIMPROUTER_ON")],
)
def test_bad_values_name_the_setting(monkeypatch, env, value, message):
    monkeypatch.setenv(env, value)
    with pytest.raises(SystemExit) as err:
        st.load(Example, [])
    assert message in str(err.value)


def test_secrets_are_masked_in_descriptions():
    assert st.describe(Example(token="hunter2"))["token"] == "***"


def test_readme_configuration_tables_are_current():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "settings_table.py"), "--check"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@dataclass
class Flags:
    demo: bool = st.setting(False, "a bare flag")
    limit: int | None = st.setting(None, "an optional number")


def test_bare_bool_flag_means_true_and_optional_types_convert():
    assert st.load(Flags, ["--demo"]).demo is True
    assert st.load(Flags, ["--demo", "false"]).demo is False
    assert st.load(Flags, ["--limit", "3"]).limit == 3
