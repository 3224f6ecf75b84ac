"""Aggregation per configuration, the report and the plots, from hand-made records."""
from __future__ import annotations

import json
import math

import pytest

from evaluation import aggregate, plots, report


def result(config, problem, correct, latency, roles, entropies=None, *, tokens=10, usage=None, glimpse_ms=0.0):
    steps = [{"index": i, "role": r, "entropy": (entropies[i] if entropies else None), "threshold": None,
              "tokens": tokens, "discarded": 0, "prefilled": 1, "cached": 50, "latency_ms": 1.0, "worker_ms": 1.0,
              "finish": "step_end", "text": f"s{i}", "ids": [i]} for i, r in enumerate(roles)]
    n_large = roles.count("large")
    role = lambda n, g: {"steps": n, "generated": n * tokens, "discarded": 0, "glimpses": g, "prefilled": 0,  # noqa: E731
                         "cached": 0, "worker_ms": 0.0}
    return {"kind": "result", "config": config, "problem": problem, "repeat": 0, "correct": correct,
            "latency_s": latency, "steps": steps, "worker_usage": usage, "glimpse_ms": glimpse_ms,
            "stats": {"steps": len(roles), "thinking_end": "eos", "small": role(len(roles) - n_large, len(entropies or [])),
                      "large": role(n_large, 0)}}


def usage(small_pre, small_cached, large_pre, large_cached):
    return {"small": {"prefilled": small_pre, "cached": small_cached}, "large": {"prefilled": large_pre, "cached": large_cached},
            "shared_worker": False}


RECORDS = [
    {"kind": "meta", "seed": 0, "models": {"small": "s", "large": "l"}, "budgets": {}, "sampling": {}},
    {"kind": "calibration", "small": {"ms_per_token": 10.0}, "large": {"ms_per_token": 30.0}},
    result("large-only", "a", True, 2.0, ["large"] * 2, usage=usage(0, 0, 100, 20)),
    {"kind": "calibration", "small": {"ms_per_token": 20.0}, "large": {"ms_per_token": 40.0}},
    result("large-only", "b", True, 4.0, ["large"] * 3, usage=usage(0, 0, 120, 40)),
    result("large-only", "c", False, 9.0, ["large"] * 2, usage=usage(0, 0, 90, 30)),
    result("glimpse@0.5", "a", True, 1.0, ["small", "large"], [0.1, 0.9], usage=usage(60, 40, 10, 5), glimpse_ms=100),
    result("glimpse@0.5", "b", False, 2.0, ["small", "small"], [0.2, 0.3], usage=usage(70, 50, 0, 0), glimpse_ms=0),
    result("glimpse@0.5", "c", True, 3.0, ["small", "large", "small", "small"], [0.1, 2.0, 0.2, 0.4],
           usage=usage(80, 60, 20, 10), glimpse_ms=200),
    result("small-only", "a", False, 0.5, ["small"], usage=usage(30, 0, 0, 0)),
    {"kind": "error", "config": "small-only", "problem": "b", "repeat": 0, "code": "UNAVAILABLE", "error": "x"},
    {"kind": "step_check", "entropy": 0.1, "agree_step": True, "agree_first": True},
    {"kind": "step_check", "entropy": 0.2, "agree_step": True, "agree_first": True},
    {"kind": "step_check", "entropy": 1.5, "agree_step": False, "agree_first": True},
    {"kind": "step_check", "entropy": 0.15, "agree_step": False, "agree_first": False},
]


@pytest.fixture
def summary():
    return aggregate.summarize(RECORDS)


def row(summary, config):
    return next(r for r in summary["configs"] if r["config"] == config)


def test_per_config_numbers(summary):
    assert [r["config"] for r in summary["configs"]] == ["large-only", "glimpse@0.5", "small-only"]
    lo = row(summary, "large-only")
    assert (lo["n"], lo["correct"]) == (3, 2)
    assert lo["accuracy"] == pytest.approx(2 / 3)
    assert lo["accuracy_se"] == pytest.approx(math.sqrt(2 / 3 * 1 / 3 / 3))
    assert lo["latency_mean_s"] == pytest.approx(5.0)
    assert lo["latency_median_s"] == pytest.approx(4.0)
    assert lo["latency_p90_s"] == pytest.approx(8.0)  # 4 + 0.8 * (9 - 4)
    assert lo["large_share"] == 1.0
    assert lo["large_tokens"] == pytest.approx((20 + 30 + 20) / 3)
    assert lo["prefill_tokens"] == pytest.approx((100 + 120 + 90) / 3)
    assert lo["reprefill_tokens"] == pytest.approx((120 + 160 + 120) / 3)
    gl = row(summary, "glimpse@0.5")
    assert gl["large_share"] == pytest.approx(2 / 8)  # pooled over steps
    assert gl["glimpses"] == pytest.approx(8 / 3)
    assert gl["glimpse_s"] == pytest.approx(0.1)
    assert gl["glimpse_share"] == pytest.approx(0.3 / 6.0)
    so = row(summary, "small-only")
    assert (so["n"], so["errors"]) == (1, 1)


def test_ideal_uses_the_calibrations_around_each_problem(summary):
    assert summary["decode_ms_per_token"] == {"small": 15.0, "large": 35.0}  # the run's median, for display
    lo = row(summary, "large-only")
    # Problem a sits between the two calibrations (mean 35 ms/token); b and c come after the last (40).
    ideals = [20 * 0.035, 30 * 0.040, 20 * 0.040]
    assert lo["ideal_s"] == pytest.approx(sum(ideals) / 3)
    assert lo["measured_over_ideal"] == pytest.approx(15.0 / sum(ideals))


def test_pareto_and_entropy_and_steps(summary):
    assert {r["config"] for r in summary["configs"] if r["pareto"]} == {"small-only", "glimpse@0.5"}
    assert summary["entropy"]["n"] == 8
    sa = summary["step_analysis"]
    assert sa["n"] == 4 and sa["agree_step_rate"] == 0.5
    # Differing steps have entropies 1.5 and 0.15 against agreeing 0.1 and 0.2: 3 of 4 pairs won.
    assert sa["auroc_step"] == pytest.approx(0.75)
    assert sa["auroc_first"] == pytest.approx(1 / 3)  # only 0.15 differs; it beats 0.1 alone


def test_an_error_retried_later_is_not_counted():
    records = RECORDS + [result("small-only", "b", True, 0.4, ["small"])]
    assert row(aggregate.summarize(records), "small-only")["errors"] == 0


def test_report_files(summary, tmp_path):
    js, md = report.write(summary, tmp_path, ["accuracy_latency.png"])
    data = json.loads(js.read_text())  # standard JSON: no NaN
    assert data["configs"][0]["config"] == "large-only"
    text = md.read_text()
    assert "| glimpse@0.5 | 3 | 66.7 ± 27.2 |" in text
    assert "## Choosing tau" in text and "## Step-level analysis" in text
    assert "![accuracy_latency.png](accuracy_latency.png)" in text


@pytest.mark.skipif(not plots.AVAILABLE, reason="matplotlib not installed")
def test_plots_are_written(summary, tmp_path):
    names = plots.write_all(summary, RECORDS, tmp_path)
    assert names == ["accuracy_latency.png", "entropy.png", "steps.png"]
    for n in names:
        assert (tmp_path / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
