"""The step-analysis sample and prefix rebuilding; the command line's errors."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from evaluation import steps
from evaluation.__main__ import main
from evaluation.dataset import Problem
from evaluation.results import ResultsFile


def result(config, problem, texts, roles=None):
    roles = roles or ["small"] * len(texts)
    return {"kind": "result", "config": config, "problem": problem, "repeat": 0,
            "steps": [{"index": i, "role": r, "text": t, "ids": [100 + i]} for i, (t, r) in enumerate(zip(texts, roles))]}


def test_sample_counts_each_prefix_once_and_skips_checked(tmp_path):
    rf = ResultsFile(tmp_path / "r.jsonl")
    # Step 0 of a problem has the same prefix (the prompt) under every config.
    rf.append(result("a", "p1", ["x", "y", "z"]))
    rf.append(result("b", "p1", ["x", "w"]))
    picks = steps.sample(rf, 100, seed=0)
    # Distinct prefixes: [], [x] (both shared by a and b) and [x, y].
    assert sorted(i for _, i in picks) == [0, 1, 2]
    # Once checked, a step is not picked again, and the total stays at n.
    r0, i0 = picks[0]
    rf.append({"kind": "step_check", "config": r0["config"], "problem": r0["problem"], "repeat": 0, "index": i0})
    again = steps.sample(rf, 100, seed=0)
    assert len(again) == 2 and i0 not in {i for _, i in again}
    assert len(steps.sample(rf, 2, seed=0)) == 1
    assert steps.sample(rf, 1, seed=0) == []


class FakeWorker:
    def __init__(self, fingerprint, offset):
        self.info = SimpleNamespace(tokenizer_fingerprint=fingerprint, think_start="", think_end="", model_id="m")
        self.offset = offset
        self.rendered = 0

    def render(self, messages):
        self.rendered += 1
        return [self.offset], "prompt"

    def tokenize(self, text):
        return [self.offset + len(text)]


def test_prefixes_token_mode_uses_the_step_ids():
    small, large = FakeWorker("f", 1), FakeWorker("f", 2)
    pre = steps.Prefixes(small, large, "{question}")
    rec = result("a", "p", ["ab", "cde"], ["small", "large"])
    p = Problem("p", "q", "1")
    # One prompt, the large model's rendering, for both roles.
    assert pre.build("small", p, rec["steps"]) == pre.build("large", p, rec["steps"]) == [2, 100, 101]
    assert small.rendered == 0


def test_prefixes_text_mode_tokenizes_the_other_models_steps():
    small, large = FakeWorker("f1", 1), FakeWorker("f2", 10)
    pre = steps.Prefixes(small, large, "{question}")
    rec = result("a", "p", ["ab", "cde"], ["small", "large"])
    p = Problem("p", "q", "1")
    assert pre.build("small", p, rec["steps"]) == [1, 100, 1 + 3]  # its own ids, then "cde" tokenized
    assert pre.build("large", p, rec["steps"]) == [10, 10 + 2, 101]


def test_help_and_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "policy specs" in capsys.readouterr().out
    assert main(["--policies", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown policy" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]) == 2
    assert main(["--report-only", "--out", str(tmp_path / "empty")]) == 2
