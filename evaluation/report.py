"""Writing the summary: summary.json (every number) and summary.md (the tables)."""
from __future__ import annotations

import json
import math
from pathlib import Path


def _clean(x):
    """NaN -> None, recursively: the JSON file stays standard JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def fmt(x, spec: str = ".2f", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def pct(x) -> str:
    return fmt(None if x is None else 100 * x, ".1f")


def config_table(rows: list[dict]) -> list[str]:
    lines = [
        "| config | n | accuracy % | latency mean s | median s | p90 s | large share % | steps | small tok | large tok "
        "| glimpses | glimpse s | prefill tok | no-reuse prefill tok | caught-up tok | switches "
        "| critical prefill / switch tok | ms | measured / ideal | Pareto |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in rows:
        acc = f"{pct(r['accuracy'])} ± {pct(r['accuracy_se'])}"
        lines.append(
            f"| {r['config']} | {r['n']}{' (+' + str(r['errors']) + ' failed)' if r['errors'] else ''} | {acc} "
            f"| {fmt(r['latency_mean_s'])} | {fmt(r['latency_median_s'])} | {fmt(r['latency_p90_s'])} "
            f"| {pct(r['large_share'])} | {fmt(r['steps_per_problem'], '.1f')} | {fmt(r['small_tokens'], '.0f')} "
            f"| {fmt(r['large_tokens'], '.0f')} | {fmt(r['glimpses'], '.1f')} | {fmt(r['glimpse_s'])} "
            f"| {fmt(r['prefill_tokens'], '.0f')} | {fmt(r['reprefill_tokens'], '.0f')} "
            f"| {fmt(r.get('caught_up_tokens'), '.0f')} | {fmt(r.get('switches_per_problem'), '.1f')} "
            f"| {fmt(r.get('critical_prefill_tokens_per_switch'), '.1f')} | {fmt(r.get('critical_prefill_ms_per_switch'), '.1f')} "
            f"| {fmt(r['measured_over_ideal'])} | {'yes' if r['pareto'] else ''} |"
        )
    return lines


def markdown(summary: dict, plots: list[str] | None = None) -> str:
    meta = summary.get("meta", {})
    out = ["# Evaluation", ""]
    if meta:
        b, s = meta.get("budgets", {}), meta.get("sampling", {})
        out += [
            f"Models: small `{meta.get('models', {}).get('small', '?')}`, large `{meta.get('models', {}).get('large', '?')}`. "
            f"Seed {meta.get('seed')}, temperature {s.get('temperature')}, top-p {s.get('top_p')}; budgets: "
            f"{b.get('step_tokens')} tokens per step, {b.get('thinking_tokens')} per problem, {b.get('max_steps')} steps.",
            "",
        ]
    out += ["## Accuracy and cost per configuration", ""]
    out += config_table(summary["configs"])
    speed = summary.get("decode_ms_per_token") or {}
    out += [
        "",
        "Accuracy ± one binomial standard error. Latency: wall seconds per problem at the client, one problem at a time. "
        "Tokens, glimpses and prefill are per problem. Glimpse s: the small model's time on glimpses that wrote "
        "nothing. Prefill: prompt tokens the workers evaluated (KV reuse on) against every call re-reading its whole "
        "prompt; caught-up: prompt tokens prefilled ahead by eager catch-up (Extend), off the critical path. "
        "Switches: changes of model between consecutive worker calls of a turn's steps (glimpse: each step calls the "
        "small model, an escalated one then the large; verify: small, then large; one-model policies: none). "
        "Critical prefill / switch: prompt tokens (and the workers' ms) the steps after the first prefilled while the "
        "request waited, over the switches. Measured / ideal: latency over the decode-only time of the tokens each model wrote"
        + (f" (measured decode: small {speed['small']:.1f} ms/token, large {speed['large']:.1f} ms/token)." if len(speed) == 2 else ".")
        + " Pareto: no other configuration is both at least as accurate and at least as fast.",
    ]
    ent = summary.get("entropy", {})
    if ent.get("n"):
        out += ["", "## Choosing tau", "",
                f"First-token entropies of {ent['n']} glimpsed steps (nats, top-20 renormalised). The threshold that "
                "would have sent a given share of them to the large model:", "",
                "| large-model share | tau |", "|---:|---:|"]
        out += [f"| {float(k) * 100:.0f}% | {fmt(v, '.3f')} |" for k, v in ent["tau_for_share"].items()]
    sa = summary.get("step_analysis")
    if sa:
        out += ["", "## Step-level analysis", "",
                f"{sa['n']} steps: the small model's first-token entropy against whether the two models' greedy "
                "continuations of the same prefix agree.", "",
                "| measure | value |", "|---|---:|",
                f"| whole steps identical | {pct(sa['agree_step_rate'])}% |",
                f"| first tokens identical | {pct(sa['agree_first_rate'])}% |",
                f"| AUROC of entropy for a differing step | {fmt(sa['auroc_step'], '.3f', 'n/a (one class)')} |",
                f"| AUROC of entropy for a differing first token | {fmt(sa['auroc_first'], '.3f', 'n/a (one class)')} |",
                f"| mean entropy, agreeing steps | {fmt(sa['mean_entropy_agree'], '.3f')} |",
                f"| mean entropy, differing steps | {fmt(sa['mean_entropy_disagree'], '.3f')} |"]
    if plots:
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def write(summary: dict, out_dir: Path, plots: list[str] | None = None) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "summary.json", out_dir / "summary.md"
    js.write_text(json.dumps(_clean(summary), indent=2) + "\n")
    md.write_text(markdown(summary, plots))
    return js, md
