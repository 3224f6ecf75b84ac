"""`python -m evaluation` end to end: a private Redis, two sim workers and a real
router, all started by the evaluation itself; then a rerun that finds nothing to do."""
from __future__ import annotations

import json
import shutil

import pytest

from evaluation.__main__ import main

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

ARGS = [
    "--backend", "sim", "--small", "sim-small", "--large", "sim-large",
    # Steps 1 and 3 start with high entropy; the large sim writes other words (seed 1).
    "--small-args", "--sim-hard-steps 1,3", "--large-args", "--sim-hard-steps 1,3 --sim-seed 1",
    "--limit", "3", "--policies", "large-only,glimpse,glimpse@0.5:mode=separate", "--thresholds", "0.5",
    "--step-sample", "4", "--calibrate-every", "2", "--quiet",
]


def records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_eval_on_sim_workers_then_resume(tmp_path, capsys):
    out = tmp_path / "ev"
    assert main([*ARGS, "--out", str(out)]) == 0
    recs = records(out)
    results = [r for r in recs if r["kind"] == "result"]
    assert len(results) == 3 * 3
    assert {r["config"] for r in results} == {"large-only", "glimpse@0.5", "glimpse@0.5:mode=separate"}
    assert all(r["prefix_mode"] == "tokens" and r["worker_usage"] for r in results)
    by = {(r["config"], r["problem"]): r for r in results}
    for pid in ("gsa-01", "gsa-02", "gsa-03"):
        fused, separate = by[("glimpse@0.5", pid)], by[("glimpse@0.5:mode=separate", pid)]
        # Same seed, same decisions and text in both glimpse modes; the hard steps go large.
        assert [s["role"] for s in fused["steps"]] == [s["role"] for s in separate["steps"]]
        assert [s["text"] for s in fused["steps"]] == [s["text"] for s in separate["steps"]]
        assert [s["index"] for s in fused["steps"] if s["role"] == "large"] == [1, 3]
        assert all(s["role"] == "large" for s in by[("large-only", pid)]["steps"])
        # Separate mode makes one Glimpse call per step; fused makes none.
        assert separate["worker_usage"]["small"]["Glimpse_calls"] == len(separate["steps"])
        assert fused["worker_usage"]["small"]["Glimpse_calls"] == 0
    assert sum(1 for r in recs if r["kind"] == "calibration") >= 2
    checks = [r for r in recs if r["kind"] == "step_check"]
    assert len(checks) == 4 and all(0 <= c["entropy"] < 4 for c in checks)

    summary = json.loads((out / "summary.json").read_text())
    rows = {r["config"]: r for r in summary["configs"]}
    assert rows["glimpse@0.5"]["large_share"] == pytest.approx(2 / 7)
    assert rows["large-only"]["large_share"] == 1.0
    assert rows["large-only"]["measured_over_ideal"] > 0
    assert summary["step_analysis"]["n"] == 4
    for name in ("summary.md", "accuracy_latency.png", "entropy.png", "steps.png"):
        assert (out / name).stat().st_size > 0

    # The same command again: everything is done, nothing reruns.
    before = len(recs)
    assert main([*ARGS, "--out", str(out)]) == 0
    assert len(records(out)) == before
    # A different seed is another run: refused rather than mixed in.
    assert main([*ARGS, "--out", str(out), "--seed", "9"]) == 2
    assert "other settings" in capsys.readouterr().err


BENCH_POLICIES = ("glimpse@0.5:catch_up=eager,glimpse@0.5:catch_up=lazy,large-only,"
                  "glimpse@0.5:mode=separate:catch_up=eager")


def test_e2e_bench_section_renders_from_a_run(tmp_path, monkeypatch, capsys):
    """The benchmark's report code on a real (sim) run, so `make bench` cannot fail late on
    it; then --report-only from the files a run leaves."""
    from benchmarks import e2e_bench
    from evaluation import dataset
    from evaluation.results import ResultsFile

    out = tmp_path / "ev"
    policies = ARGS.index("--policies") + 1
    argv = [*ARGS[:policies], BENCH_POLICIES, *ARGS[policies + 1:]]
    assert main([*argv, "--out", str(out)]) == 0
    args = e2e_bench.parser().parse_args(["--layouts", "default,pinned,sim", "--tau", "0.5", "--problems", "3",
                                          "--sim-problems", "3", "--separate-problems", "3", "--step-sample", "4"])
    problems = dataset.load(dataset.SAMPLE)
    runs = []
    for layout, skipped in (("default", ""), ("pinned", "the pinned layout needs 2 CPUs"), ("sim", "")):
        opts, _ = e2e_bench.layout_options(layout, args, problems)
        runs.append(e2e_bench.LayoutRun(layout, opts, None if skipped else ResultsFile(out / "results.jsonl"), 60.0,
                                        skipped))
    text = e2e_bench.section(runs, args)
    for heading in ("### Default: both workers on all cores", "### Pinned: one core per worker",
                    "### Sim: a modelled GPU pair", "Time to first token", "Fused against separate",
                    "Prefill per session", "Does first-token entropy"):
        assert heading in text
    assert "Not run: the pinned layout needs 2 CPUs." in text
    assert text.count("Does first-token entropy") == 1  # the default layout's extras only there
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| glimpse@0.5:catch_up=")
            or line.startswith("| large-only |")]
    rows = [r for r in rows if len(r) == 11]  # the main table of each layout
    assert len(rows) == 2 * 3  # default and sim
    # Sim steps 1 and 3 are hard: s | s L | s | s L | s | s | s = 4 switches per problem under glimpse.
    assert all(r[7] == "4.0" for r in rows if r[0].startswith("| glimpse"))
    assert all(r[7] == "0.0" and r[8] == "-" and r[9] == "-" for r in rows if r[0] == "| large-only")
    assert all(r[6] == "1.00" for r in rows if r[0] == "| large-only")  # its own ratio against itself
    assert "identical on 3 of 3 problems" in text  # sim workers: same seed, same steps in both modes

    # --report-only reads each layout's own file and states the flags the run used.
    monkeypatch.setattr(e2e_bench, "OUT", tmp_path / "bench")
    (tmp_path / "bench" / "sim").mkdir(parents=True)
    shutil.copy(out / "results.jsonl", tmp_path / "bench" / "sim" / "results.jsonl")
    ResultsFile(tmp_path / "bench" / "sim" / "results.jsonl").append(
        {"kind": "bench", "layout": "sim", "wall_s": 90.0, "args": {**{k: getattr(args, k) for k in e2e_bench.STORED},
                                                                    "sim_problems": 3}})
    capsys.readouterr()
    assert e2e_bench.main(["--report-only", "--no-write", "--layouts", "sim,default"]) == 0
    printed = capsys.readouterr().out
    assert "--sim-problems 3" in printed and "--tau 0.5" in printed and "whole run: 1.5 min" in printed
    assert "| glimpse@0.5:catch_up=eager | 3 | n/a |" in printed
    assert "Not run: no results in" in printed  # the default layout left no file there
