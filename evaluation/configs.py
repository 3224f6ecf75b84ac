"""What to compare: routing configurations written as short specs.

    glimpse@0.9                  the paper's rule at tau = 0.9 nats
    glimpse@0.9:mode=separate    the same, with Glimpse and Generate as two calls
    glimpse:entropy=full         entropy over the whole vocabulary
    large-only, small-only       one model writes every step
    random:p=0.3                 a coin: the large model writes 30% of steps
    verify:accept_score=7        SpecReason (draft, score, rewrite below 7)
    step-entropy@0.5             mean entropy of the small model's whole step
    adaptive:target=0.25         tau tracked to send 25% of steps to the large model
    glimpse@0.9:catch_up=lazy    the model not writing a step reads it at its next call
                                 (eager: while it streams; unset: the router's --catch-up)

`mode`, `entropy`, `top_k` and `catch_up` set routing fields; any other key is a
policy parameter the router checks. A glimpse or step-entropy spec without `@tau` is
expanded into one configuration per threshold of the sweep.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from services.router.api import Entropy, GlimpseMode, RoutingOptions
from services.router.api.types import CatchUp

POLICIES = ("glimpse", "large-only", "small-only", "random", "verify", "step-entropy", "adaptive")
SWEPT = ("glimpse", "step-entropy")  # policies whose tau the --thresholds sweep sets
_ROUTING_KEYS = ("mode", "entropy", "top_k", "catch_up")
_MODES = {m.value: m for m in GlimpseMode}
_ENTROPIES = {e.value: e for e in Entropy}
_CATCH_UPS = {c.value: c for c in CatchUp}
DEFAULT_TAU = 0.9


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Config:
    policy: str
    threshold: float | None = None
    mode: str = "fused"
    entropy: str = "top_k"
    top_k: int | None = None
    params: tuple[tuple[str, float], ...] = field(default_factory=tuple)
    catch_up: str | None = None  # "eager" | "lazy"; None: the router's default (--catch-up)

    @property
    def label(self) -> str:
        """The spec in one canonical spelling: the key results are stored under."""
        s = self.policy
        if self.threshold is not None:
            s += f"@{self.threshold:g}"
        extra = []
        if self.mode != "fused":
            extra.append(f"mode={self.mode}")
        if self.entropy != "top_k":
            extra.append(f"entropy={self.entropy}")
        if self.top_k is not None:
            extra.append(f"top_k={self.top_k}")
        if self.catch_up is not None:
            extra.append(f"catch_up={self.catch_up}")
        extra += [f"{k}={v:g}" for k, v in self.params]
        return ":".join([s, *extra])

    @property
    def glimpses(self) -> bool:
        return self.policy in ("glimpse", "adaptive")

    def routing(self) -> RoutingOptions:
        return RoutingOptions(self.policy, self.threshold, dict(self.params), _MODES[self.mode], _ENTROPIES[self.entropy],
                              self.top_k, _CATCH_UPS[self.catch_up] if self.catch_up is not None else None)


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{what} must be a number, got {text!r}") from None


def parse(spec: str) -> Config:
    head, *parts = spec.strip().split(":")
    policy, _, tau = head.partition("@")
    if policy not in POLICIES:
        raise ConfigError(f"unknown policy {policy!r} in {spec!r}; choose from {', '.join(POLICIES)}")
    fields: dict = {"policy": policy}
    if tau:
        fields["threshold"] = _number(tau, f"the threshold in {spec!r}")
    params = []
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise ConfigError(f"{part!r} in {spec!r} is not key=value")
        if key == "mode":
            if value not in _MODES:
                raise ConfigError(f"mode must be fused or separate, got {value!r}")
            fields["mode"] = value
        elif key == "entropy":
            if value not in _ENTROPIES:
                raise ConfigError(f"entropy must be top_k or full, got {value!r}")
            fields["entropy"] = value
        elif key == "top_k":
            fields["top_k"] = int(_number(value, "top_k"))
        elif key == "catch_up":
            if value not in _CATCH_UPS:
                raise ConfigError(f"catch_up must be {' or '.join(_CATCH_UPS)}, got {value!r} in {spec!r}")
            fields["catch_up"] = value
        else:
            params.append((key, _number(value, f"parameter {key!r}")))
    fields["params"] = tuple(sorted(params))
    return Config(**fields)


def expand(specs: list[str], thresholds: list[float]) -> list[Config]:
    """Parse specs; a swept policy without a threshold becomes one config per
    threshold (or the router's default tau when the sweep is empty)."""
    out: list[Config] = []
    for spec in specs:
        c = parse(spec)
        if c.policy in SWEPT and c.threshold is None:
            taus = thresholds or [DEFAULT_TAU]
            out += [replace(c, threshold=t) for t in taus]
        elif c.policy == "adaptive" and c.threshold is None:
            out.append(replace(c, threshold=DEFAULT_TAU))
        else:
            out.append(c)
    labels = [c.label for c in out]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ConfigError(f"configuration listed twice: {', '.join(dupes)}")
    return out
