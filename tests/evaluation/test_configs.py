from __future__ import annotations

import pytest

from evaluation import configs
from services.router.api import GlimpseMode


def test_parse_and_label_round_trip():
    for spec in ("glimpse@0.9", "glimpse@0.9:mode=separate", "large-only", "random:p=0.3", "verify:accept_score=7",
                 "adaptive@0.9:target=0.25", "glimpse@1.5:entropy=full:top_k=10"):
        c = configs.parse(spec)
        assert c.label == spec
        assert configs.parse(c.label) == c


def test_routing_options():
    r = configs.parse("glimpse@0.6:mode=separate").routing()
    assert (r.policy, r.threshold, r.glimpse_mode) == ("glimpse", pytest.approx(0.6), GlimpseMode.SEPARATE)
    r = configs.parse("random:p=0.3").routing()
    assert r.threshold is None and r.params == {"p": pytest.approx(0.3)}


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
