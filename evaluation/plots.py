"""PNG plots of a run (matplotlib, the `eval` extra):

- accuracy_latency.png: every configuration as a point (mean latency, accuracy
  with a standard-error bar); the tau sweep of each policy joined in threshold
  order; the Pareto frontier dashed.
- entropy.png: the distribution of first-token entropies of glimpsed steps, with
  each swept tau and the share of steps at or above it.
- steps.png (when the step analysis ran): entropy of agreeing against differing
  steps, and the ROC curve of entropy for a differing step.
"""
from __future__ import annotations

import math
from pathlib import Path

from evaluation import configs, stats

try:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
except ImportError:  # pragma: no cover - depends on the environment
    plt = None

AVAILABLE = plt is not None


def _valid(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def accuracy_latency(summary: dict, path: Path) -> Path:
    rows = [r for r in summary["configs"] if _valid(r["latency_mean_s"]) and _valid(r["accuracy"])]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    sweeps: dict[str, list[tuple[float, dict]]] = {}
    for r in rows:
        c = configs.parse(r["config"])
        if c.policy in configs.SWEPT and c.threshold is not None:
            series = r["config"].replace(f"@{c.threshold:g}", "")
            sweeps.setdefault(series, []).append((c.threshold, r))
    swept = {id(r) for pts in sweeps.values() for _, r in pts}
    for name, pts in sorted(sweeps.items()):
        pts.sort(key=lambda p: p[0])
        xs = [r["latency_mean_s"] for _, r in pts]
        ys = [100 * r["accuracy"] for _, r in pts]
        err = [100 * (r["accuracy_se"] or 0) for _, r in pts]
        line = ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"{name} (tau sweep)")
        for (tau, _), x, y in zip(pts, xs, ys):
            ax.annotate(f"τ={tau:g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8,
                        color=line[0].get_color())
    markers = iter("s^vDPX*<>hp")
    for r in rows:
        if id(r) in swept:
            continue
        ax.errorbar([r["latency_mean_s"]], [100 * r["accuracy"]], yerr=[100 * (r["accuracy_se"] or 0)],
                    marker=next(markers, "o"), markersize=8, capsize=3, linestyle="none", label=r["config"])
    front = sorted((r["latency_mean_s"], 100 * r["accuracy"]) for r in rows if r.get("pareto"))
    if len(front) > 1:
        ax.plot(*zip(*front), linestyle="--", color="grey", linewidth=1, label="Pareto frontier", drawstyle="steps-post")
    ax.set_xlabel("mean latency per problem (s)")
    ax.set_ylabel("accuracy (%)")
    n = max((r["n"] for r in rows), default=0)
    ax.set_title(f"Accuracy against latency ({n} problems per configuration)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def entropy(entropies: list[float], taus: list[float], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(entropies, bins=40, color="#4477aa", alpha=0.85)
    for tau in sorted(set(taus)):
        share = sum(1 for h in entropies if h >= tau) / len(entropies)
        ax.axvline(tau, color="#cc3311", linestyle="--", linewidth=1)
        ax.annotate(f"τ={tau:g}: {100 * share:.0f}% large", (tau, 0.95), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=8, color="#cc3311")
    ax.set_xlabel("first-token entropy of the small model (nats, top-20)")
    ax.set_ylabel("glimpsed steps")
    ax.set_title(f"First-token entropy at step starts ({len(entropies)} glimpses)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def steps(checks: list[dict], path: Path) -> Path:
    agree = [c["entropy"] for c in checks if c["agree_step"]]
    differ = [c["entropy"] for c in checks if not c["agree_step"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    bins = 30
    if agree:
        ax1.hist(agree, bins=bins, alpha=0.6, label=f"same step ({len(agree)})", color="#228833")
    if differ:
        ax1.hist(differ, bins=bins, alpha=0.6, label=f"different step ({len(differ)})", color="#cc3311")
    ax1.set_xlabel("small model's first-token entropy (nats)")
    ax1.set_ylabel("steps")
    ax1.set_title("Greedy continuations of the same prefix")
    ax1.legend(fontsize=8)
    for key, label in (("agree_step", "whole step"), ("agree_first", "first token")):
        labels = [not c[key] for c in checks]
        h = [c["entropy"] for c in checks]
        area = stats.auroc(h, labels)
        fpr, tpr = stats.roc_curve(h, labels)
        ax2.plot(fpr, tpr, label=f"{label} differs: AUROC {area:.3f}" if area is not None else f"{label}: one class")
    ax2.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax2.set_xlabel("false positive rate")
    ax2.set_ylabel("true positive rate")
    ax2.set_title("Entropy as a detector of disagreement")
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_all(summary: dict, records: list[dict], out_dir: Path) -> list[str]:
    """Every plot the data allows; returns the file names written."""
    if not AVAILABLE:
        return []
    from evaluation.aggregate import glimpse_entropies

    written = []
    if summary["configs"]:
        written.append(accuracy_latency(summary, out_dir / "accuracy_latency.png").name)
    results = [r for r in records if r.get("kind") == "result"]
    ent = glimpse_entropies(results)
    if ent:
        taus = [configs.parse(r["config"]).threshold for r in summary["configs"]
                if configs.parse(r["config"]).policy == "glimpse"]
        written.append(entropy(ent, [t for t in taus if t is not None], out_dir / "entropy.png").name)
    checks = [r for r in records if r.get("kind") == "step_check"]
    if checks:
        written.append(steps(checks, out_dir / "steps.png").name)
    return written
