"""From the run's records to one summary per configuration.

Definitions (per configuration; "per problem" means the mean over its results):
- accuracy: share of results whose extracted answer equals the gold answer;
  `accuracy_se` its binomial standard error.
- latency: wall seconds per problem at the client (mean, median, p90).
- large_share: steps written by the large model / all steps (pooled).
- tokens: generated per problem by each model (steps and answer), and drafts the
  small model wrote and the policy threw away (verify, step-entropy).
- glimpses and glimpse_s: glimpses per problem, and the small model's seconds on
  glimpses that wrote nothing (see runner.glimpse_ms); glimpse_share = that time /
  latency.
- prefill: prompt tokens the workers evaluated per problem (every call, from their
  counters), against `reprefill`: what they would evaluate with no KV reuse
  (every call re-reading its whole prompt = prefilled + cached).
- ideal_s: the problem's latency if each generated token cost only its model's
  measured decode time, priced with the calibrations just before and just after
  the problem (the mean of the two: a shared machine's speed drifts during a run);
  measured_over_ideal = sum of latencies / sum of ideals.
- caught_up_tokens: prompt tokens the workers prefilled ahead for eager catch-up
  (Extend calls) per problem, apart from `prefill` (which counts the calls' own).
- switches: see `worker_calls`. A turn's steps call the models in a sequence; a
  switch is a change of model between two consecutive calls of that sequence.
  switches_per_problem is their mean per problem.
- critical prefill per switch: over the steps after the first (the first step
  pays the prompt), the sum of each step's critical_prefill_tokens (prompt tokens
  its worker calls prefilled while the request waited) and critical_prefill_ms
  (the workers' prefill time for them), divided by the switches; pooled over the
  config's problems. None when no switch happened (large-only, small-only).
"""
from __future__ import annotations

import bisect
import math
import statistics
from collections import Counter
from typing import Iterable

from evaluation import configs, stats


def decode_speeds(records: Iterable[dict]) -> dict[str, float]:
    """Median ms per decoded token of each role over the run's calibrations."""
    out: dict[str, list[float]] = {}
    for r in records:
        if r.get("kind") == "calibration":
            for role in ("small", "large"):
                if role in r:
                    out.setdefault(role, []).append(r[role]["ms_per_token"])
    return {role: statistics.median(v) for role, v in out.items() if v}


def local_speeds(records: list[dict]) -> dict[int, dict[str, float]]:
    """For each result (by its position in `records`), each role's ms/token: the mean of
    the nearest calibration before it and the nearest after it (one if only one exists)."""
    cal = [(i, r) for i, r in enumerate(records) if r.get("kind") == "calibration"
           and "small" in r and "large" in r]
    out: dict[int, dict[str, float]] = {}
    if not cal:
        return out
    positions = [i for i, _ in cal]
    for i, r in enumerate(records):
        if r.get("kind") != "result":
            continue
        k = bisect.bisect_left(positions, i)
        near = [cal[j][1] for j in (k - 1, k) if 0 <= j < len(cal)]
        out[i] = {role: statistics.fmean(c[role]["ms_per_token"] for c in near) for role in ("small", "large")}
    return out


def ideal_seconds(rec: dict, speed: dict[str, float]) -> float | None:
    if set(speed) != {"small", "large"}:
        return None
    st = rec["stats"]
    return (st["small"]["generated"] * speed["small"] + st["large"]["generated"] * speed["large"]) / 1e3


def worker_calls(config: configs.Config, step: dict) -> list[str]:
    """The models one step called, in order (as the router's policies call them):
    glimpse and adaptive, fused or separate: the small model (its Step or Glimpse),
    then the large model when it wrote the step; verify: the small model drafts, the
    large one scores (and rewrites below the bar); step-entropy: the small model
    drafts, the large one rewrites when the draft's entropy is high; large-only,
    small-only, random: the writer alone. The answer call that may follow the steps
    (thinking models) is not a step and is not counted: the stream does not report
    its critical-path prefill."""
    role = step["role"]
    if config.policy in ("glimpse", "adaptive", "step-entropy"):
        return ["small"] if role == "small" else ["small", "large"]
    if config.policy == "verify":
        return ["small", "large"]
    return [role]


def switches(config: configs.Config, steps: list[dict]) -> int:
    """Changes of model between consecutive worker calls over a turn's steps."""
    calls = [m for s in steps for m in worker_calls(config, s)]
    return sum(1 for a, b in zip(calls, calls[1:]) if a != b)


def critical_prefill_after_first(steps: list[dict]) -> tuple[float, float]:
    """Critical-path prefill (tokens, ms) of every step but the first (which pays the prompt)."""
    rest = sorted(steps, key=lambda s: s["index"])[1:]
    return (float(sum(s.get("critical_prefill_tokens", 0) for s in rest)),
            float(sum(s.get("critical_prefill_ms", 0.0) for s in rest)))


def switch_costs(label: str, results: list[dict]) -> dict:
    """Switches per problem, and critical-path prefill per switch (pooled)."""
    config = configs.parse(label)
    n_switches = [switches(config, sorted(r["steps"], key=lambda s: s["index"])) for r in results]
    tokens = ms = 0.0
    for r in results:
        t, m = critical_prefill_after_first(r["steps"])
        tokens, ms = tokens + t, ms + m
    total = sum(n_switches)
    return {
        "switches_per_problem": stats.mean(n_switches) if results else math.nan,
        "critical_prefill_tokens_per_switch": tokens / total if total else None,
        "critical_prefill_ms_per_switch": ms / total if total else None,
        # The same over the steps after the first, per problem: what a config without
        # switches pays too (the boundary tokens of its own steps).
        "critical_prefill_tokens_per_problem": tokens / len(results) if results else math.nan,
        "critical_prefill_ms_per_problem": ms / len(results) if results else math.nan,
    }


def _per_problem(results: list[dict], fn) -> float:
    return stats.mean([fn(r) for r in results])


def summarize_config(label: str, results: list[dict], errors: int, speeds: list[dict[str, float]]) -> dict:
    """`speeds[i]`: the decode speeds to price results[i] with (empty: no calibration)."""
    n = len(results)
    correct = sum(bool(r["correct"]) for r in results)
    lat = [r["latency_s"] for r in results]
    all_steps = [s for r in results for s in r["steps"]]
    large_steps = sum(1 for s in all_steps if s["role"] == "large")
    usage = [r["worker_usage"] for r in results if r.get("worker_usage")]
    prefilled = [u["small"]["prefilled"] + (0 if u.get("shared_worker") else u["large"]["prefilled"]) for u in usage]
    caught_up = [u["small"].get("caught_up", 0.0) + (0 if u.get("shared_worker") else u["large"].get("caught_up", 0.0))
                 for u in usage]
    reprefill = [u["small"]["prefilled"] + u["small"]["cached"]
                 + (0 if u.get("shared_worker") else u["large"]["prefilled"] + u["large"]["cached"]) for u in usage]
    gl = [r["glimpse_ms"] / 1e3 for r in results if r.get("glimpse_ms") is not None]
    ideals = [ideal_seconds(r, sp) for r, sp in zip(results, speeds)]
    paired = [(r["latency_s"], i) for r, i in zip(results, ideals) if i]
    return {
        "config": label,
        "policy": configs.parse(label).policy,
        "n": n,
        "errors": errors,
        "correct": correct,
        "accuracy": correct / n if n else math.nan,
        "accuracy_se": stats.binomial_se(correct, n),
        "latency_mean_s": stats.mean(lat),
        "latency_median_s": statistics.median(lat) if lat else math.nan,
        "latency_p90_s": stats.quantile(lat, 0.9),
        "steps_per_problem": len(all_steps) / n if n else math.nan,
        "large_share": large_steps / len(all_steps) if all_steps else math.nan,
        "small_tokens": _per_problem(results, lambda r: r["stats"]["small"]["generated"]),
        "large_tokens": _per_problem(results, lambda r: r["stats"]["large"]["generated"]),
        "discarded_tokens": _per_problem(results, lambda r: r["stats"]["small"]["discarded"]),
        "glimpses": _per_problem(results, lambda r: r["stats"]["small"]["glimpses"]),
        "glimpse_s": stats.mean(gl) if gl else None,
        "glimpse_share": (sum(gl) / sum(lat)) if gl and len(gl) == n and sum(lat) else None,
        "prefill_tokens": stats.mean(prefilled) if prefilled else None,
        "reprefill_tokens": stats.mean(reprefill) if reprefill else None,
        "caught_up_tokens": stats.mean(caught_up) if caught_up else None,
        "ideal_s": stats.mean([i for i in ideals if i]) if paired else None,
        "measured_over_ideal": (sum(m for m, _ in paired) / sum(i for _, i in paired)) if paired else None,
        "thinking_end": dict(Counter(r["stats"]["thinking_end"] for r in results)),
        **switch_costs(label, results),
    }


def glimpse_entropies(results: Iterable[dict]) -> list[float]:
    """First-token entropies of every glimpsed step (glimpse and adaptive policies)."""
    out = []
    for r in results:
        if not configs.parse(r["config"]).glimpses:
            continue
        out += [s["entropy"] for s in r["steps"] if s["entropy"] is not None]
    return out


def step_analysis(records: Iterable[dict]) -> dict | None:
    checks = [r for r in records if r.get("kind") == "step_check"]
    if not checks:
        return None
    h = [c["entropy"] for c in checks]
    dis_step = [not c["agree_step"] for c in checks]
    dis_first = [not c["agree_first"] for c in checks]
    agree_h = [c["entropy"] for c in checks if c["agree_step"]]
    disagree_h = [c["entropy"] for c in checks if not c["agree_step"]]
    return {
        "n": len(checks),
        "agree_step_rate": 1 - sum(dis_step) / len(checks),
        "agree_first_rate": 1 - sum(dis_first) / len(checks),
        "auroc_step": stats.auroc(h, dis_step),
        "auroc_first": stats.auroc(h, dis_first),
        "mean_entropy_agree": stats.mean(agree_h) if agree_h else None,
        "mean_entropy_disagree": stats.mean(disagree_h) if disagree_h else None,
    }


def summarize(records: list[dict]) -> dict:
    results = [r for r in records if r.get("kind") == "result"]
    errors = Counter(r["config"] for r in records if r.get("kind") == "error")
    done = {(r["config"], r["problem"], r["repeat"]) for r in results}
    # An error later retried successfully is not an error of the run.
    for r in records:
        if r.get("kind") == "error" and (r["config"], r["problem"], r["repeat"]) in done:
            errors[r["config"]] -= 1
    order: list[str] = []
    for r in results:
        if r["config"] not in order:
            order.append(r["config"])
    speed = decode_speeds(records)
    local = local_speeds(records)
    rows = []
    for c in order:
        mine = [(i, r) for i, r in enumerate(records) if r.get("kind") == "result" and r["config"] == c]
        rows.append(summarize_config(c, [r for _, r in mine], errors.get(c, 0), [local.get(i, {}) for i, _ in mine]))
    front = stats.pareto_front({row["config"]: (row["latency_mean_s"], row["accuracy"]) for row in rows})
    for row in rows:
        row["pareto"] = row["config"] in front
    ent = glimpse_entropies(results)
    meta = next((r for r in records if r.get("kind") == "meta"), {})
    return {
        "meta": {k: v for k, v in meta.items() if k != "kind"},
        "decode_ms_per_token": speed,
        "configs": rows,
        "entropy": {
            "n": len(ent),
            "quantiles": {str(q): stats.quantile(ent, q) for q in (0.1, 0.25, 0.5, 0.75, 0.9)} if ent else {},
            "tau_for_share": {str(s): stats.tau_for_share(ent, s) for s in (0.1, 0.2, 0.25, 0.3, 0.5)} if ent else {},
        },
        "step_analysis": step_analysis(records),
    }
