from __future__ import annotations

import pytest

from evaluation import configs
from services.router.api import GlimpseMode
from services.router.api.types import CatchUp


def test_parse_and_label_round_trip():
    for spec in ("glimpse@0.9", "glimpse@0.9:mode=separate", "large-only", "random:p=0.3", "verify:accept_score=7",
                 "adaptive@0.9:target=0.25", "glimpse@1.5:entropy=full:top_k=10", "glimpse@0.9:catch_up=lazy",
                 "glimpse@0.9:mode=separate:catch_up=eager", "adaptive@0.9:catch_up=lazy:target=0.25"):
        c = configs.parse(spec)
        assert c.label == spec
        assert configs.parse(c.label) == c


def test_routing_options():
    r = configs.parse("glimpse@0.6:mode=separate").routing()
    assert (r.policy, r.threshold, r.glimpse_mode) == ("glimpse", pytest.approx(0.6), GlimpseMode.SEPARATE)
    r = configs.parse("random:p=0.3").routing()
    assert r.threshold is None and r.params == {"p": pytest.approx(0.3)}


def test_catch_up_maps_to_routing_and_is_in_the_label():
    assert configs.parse("glimpse@0.9:catch_up=eager").routing().catch_up is CatchUp.EAGER
    assert configs.parse("large-only:catch_up=lazy").routing().catch_up is CatchUp.LAZY
    assert configs.parse("glimpse@0.9").routing().catch_up is None  # the router's --catch-up decides
    # Any order in, one canonical spelling out; eager and lazy are different configurations.
    assert configs.parse("glimpse@0.9:catch_up=lazy:mode=separate").label == "glimpse@0.9:mode=separate:catch_up=lazy"
    labels = [c.label for c in configs.expand(["glimpse:catch_up=eager", "glimpse:catch_up=lazy"], [0.5, 0.9])]
    assert labels == ["glimpse@0.5:catch_up=eager", "glimpse@0.9:catch_up=eager",
                      "glimpse@0.5:catch_up=lazy", "glimpse@0.9:catch_up=lazy"]


@pytest.mark.parametrize("value", ["", "Eager", "none", "1"])
def test_bad_catch_up_says_what_is_allowed(value):
    with pytest.raises(configs.ConfigError, match="catch_up must be eager or lazy"):
        configs.parse(f"glimpse@0.9:catch_up={value}")


def test_expand_sweeps_thresholds():
    labels = [c.label for c in configs.expand(["large-only", "glimpse", "step-entropy@2", "adaptive"], [0.5, 1.0])]
    assert labels == ["large-only", "glimpse@0.5", "glimpse@1", "step-entropy@2", "adaptive@0.9"]
    assert [c.label for c in configs.expand(["glimpse"], [])] == ["glimpse@0.9"]


@pytest.mark.parametrize("spec", ["nope", "glimpse@x", "glimpse:mode=both", "random:p", "glimpse:entropy=all"])
def test_bad_specs(spec):
    with pytest.raises(configs.ConfigError):
        configs.parse(spec)


def test_duplicates_rejected():
    with pytest.raises(configs.ConfigError, match="twice"):
        configs.expand(["glimpse@0.9", "glimpse"], [0.9])
