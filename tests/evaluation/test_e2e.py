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


def test_e2e_bench_section_renders_from_a_run(tmp_path):
    """The benchmark's report code on a real (sim) run, so `make bench` cannot fail late on it."""
    import argparse

    from benchmarks import e2e_bench
    from evaluation import configs, dataset
    from evaluation.results import ResultsFile
    from evaluation.runner import RunOptions

    out = tmp_path / "ev"
    assert main([*ARGS, "--out", str(out)]) == 0
    args = argparse.Namespace(problems=3, separate_problems=3, tau=0.5, step_sample=4, step_check_tokens=64,
                              calibrate_every=2, small="sim-small", large="sim-large", seed=0)
    opts = RunOptions(configs=configs.expand(["glimpse@0.5", "glimpse@0.5:mode=separate", "large-only"], []),
                      problems=dataset.load(dataset.SAMPLE)[:3])
    text = e2e_bench.section(ResultsFile(out / "results.jsonl"), opts, 60.0, args)
    for heading in ("Glimpse against the large model alone", "Measured against the ideal", "Fused against separate",
                    "Prefill per session", "Does first-token entropy"):
        assert heading in text
    assert "identical on 3 of 3 problems" in text  # sim workers: same seed, same steps in both modes
