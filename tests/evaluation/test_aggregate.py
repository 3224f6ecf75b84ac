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


# ---- switches and the prefill they leave on the critical path --------------------------------
def steps(roles, crit_tokens, crit_ms=None):
    crit_ms = crit_ms or [10.0 * t for t in crit_tokens]
    return [{"index": i, "role": r, "critical_prefill_tokens": t, "critical_prefill_ms": m}
            for i, (r, t, m) in enumerate(zip(roles, crit_tokens, crit_ms))]


@pytest.mark.parametrize("label, roles, expected", [
    # glimpse: every step calls the small model; an escalated one then calls the large.
    # s | s L | s L | s | s -> s s L s L s s: four changes.
    ("glimpse@0.9:catch_up=eager", ["small", "large", "large", "small", "small"], 4),
    ("glimpse@0.9:mode=separate", ["small", "large", "large", "small", "small"], 4),
    ("glimpse@0.9", ["small", "small", "small"], 0),
    ("glimpse@0.9", ["large"], 1),  # s L within one step
    ("adaptive@0.9:target=0.25", ["small", "large"], 1),  # s | s L
    ("large-only", ["large"] * 4, 0),
    ("small-only", ["small"] * 4, 0),
    ("random:p=0.5", ["small", "large", "small", "small"], 2),  # the writer alone
    ("verify", ["small", "small"], 3),  # s L | s L: the large model scores every draft
    ("verify", ["large", "small"], 3),
    ("step-entropy@1", ["small", "large", "small"], 2),  # s | s L | s: the draft, then the rewrite
])
def test_switches_follow_the_calls_each_policy_makes(label, roles, expected):
    from evaluation import configs
    assert aggregate.switches(configs.parse(label), steps(roles, [0] * len(roles))) == expected


def test_critical_prefill_per_switch_leaves_out_the_first_step():
    glimpse = "glimpse@0.9:catch_up=lazy"
    a = {"config": glimpse, "steps": steps(["small", "large", "small"], [120, 40, 35])}  # s | s L | s: 2 switches
    b = {"config": glimpse, "steps": list(reversed(steps(["large", "small"], [200, 50])))}  # s L | s: 2; order by index
    c = {"config": glimpse, "steps": steps(["small", "small"], [90, 1])}  # none: its 1 token still counts
    costs = aggregate.switch_costs(glimpse, [a, b, c])
    assert costs["switches_per_problem"] == pytest.approx(4 / 3)
    assert costs["critical_prefill_tokens_per_switch"] == pytest.approx((40 + 35 + 50 + 1) / 4)
    assert costs["critical_prefill_ms_per_switch"] == pytest.approx(10 * (40 + 35 + 50 + 1) / 4)
    assert costs["critical_prefill_tokens_per_problem"] == pytest.approx((40 + 35 + 50 + 1) / 3)
    lo = aggregate.switch_costs("large-only", [{"steps": steps(["large"] * 3, [100, 2, 2])}])
    assert lo["switches_per_problem"] == 0
    assert lo["critical_prefill_tokens_per_switch"] is None and lo["critical_prefill_ms_per_switch"] is None


def test_records_without_critical_prefill_still_aggregate(summary):
    # Results written before steps reported their critical prefill: zero, not a crash.
    gl = row(summary, "glimpse@0.5")
    assert gl["switches_per_problem"] == pytest.approx((1 + 0 + 2) / 3)  # s s L; s s; s s L s s
    assert gl["critical_prefill_tokens_per_switch"] == 0


def test_caught_up_tokens_are_summed_over_both_workers():
    u = usage(60, 40, 10, 5)
    u["small"]["caught_up"], u["large"]["caught_up"] = 7, 120
    rec = result("glimpse@0.5", "a", True, 1.0, ["small", "large"], [0.1, 0.9], usage=u)
    assert row(aggregate.summarize([rec]), "glimpse@0.5")["caught_up_tokens"] == 127
