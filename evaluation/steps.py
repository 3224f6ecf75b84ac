"""Step-level analysis: does the small model's first-token entropy tell where the two
models would write different steps? (The paper's central claim, on our models.)

For a sample of steps taken from the run's own trajectories, rebuild the prefix
the router gave that step, then ask the workers directly:
  - Glimpse on the small worker: the first-token entropy H (top-20, nats);
  - greedy Generate of the step on the small worker, and greedy GenerateStream on
    the large one, compared as they come (the large stream is cancelled at the
    first difference, which saves most of its decoding);
  - the two greedy first tokens (Glimpse on both).
A step "disagrees" when the greedy continuations differ (within the first
`max_tokens` tokens: --step-check-tokens, 64 by default). AUROC of H for
disagreement is reported for whole steps and for first tokens: 0.5 is chance, 1
means every disagreeing step had a higher entropy than every agreeing one.
"""
from __future__ import annotations

import hashlib
import random
import sys

from tqdm import tqdm

from evaluation.client import WorkerClient
from evaluation.results import ResultsFile
from evaluation.runner import messages
from glimprouter.v1 import worker_pb2 as wpb


class Prefixes:
    """Rebuilds a step's prefix per model, as the router builds it."""

    def __init__(self, small: WorkerClient, large: WorkerClient, template: str) -> None:
        self.workers = {"small": small, "large": large}
        fs, fl = small.info.tokenizer_fingerprint, large.info.tokenizer_fingerprint
        self.token_mode = bool(fs) and fs == fl
        self.think = bool(small.info.think_end and large.info.think_end)
        self.think_start = large.info.think_start or small.info.think_start or "<think>"
        self.think_end = large.info.think_end or small.info.think_end or "</think>"
        self.template = template
        self._prompts: dict[tuple[str, str], list[int]] = {}

    def _prompt(self, role: str, problem) -> list[int]:
        # Token mode: one prompt, rendered by the large model's template (as the router does).
        who = "large" if self.token_mode else role
        key = (who, problem.id)
        if key not in self._prompts:
            w = self.workers[who]
            ids, text = w.render(messages(problem, self.template))
            if self.think and not text.rstrip().endswith(self.think_start):
                ids += w.tokenize(self.think_start + "\n")
            self._prompts[key] = ids
        return self._prompts[key]

    def build(self, role: str, problem, steps: list[dict]) -> list[int]:
        ids = list(self._prompt(role, problem))
        for s in steps:
            if self.token_mode or s["role"] == role:
                ids += s["ids"]
            else:  # text mode: the other model's step, in this model's tokens
                ids += self.workers[role].tokenize(s["text"])
        return ids


def _prefix_key(rec: dict, index: int) -> str:
    h = hashlib.sha256(rec["problem"].encode())
    for s in rec["steps"][:index]:
        h.update(b"\0" + s["text"].encode())
    return h.hexdigest()


def sample(results: ResultsFile, n: int, seed: int) -> list[tuple[dict, int]]:
    """Up to n steps not checked yet, uniformly over distinct prefixes (step 0 of a
    problem is the same prompt under every config: it counts once)."""
    by_key = {(r["config"], r["problem"], r["repeat"]): r for r in results.of_kind("result")}
    checks = list(results.of_kind("step_check"))
    seen = set()
    for c in checks:
        rec = by_key.get((c["config"], c["problem"], c["repeat"]))
        if rec is not None:
            seen.add(_prefix_key(rec, c["index"]))
    wanted = n - len(checks)
    if wanted <= 0:
        return []
    candidates: dict[str, tuple[dict, int]] = {}
    for rec in by_key.values():
        for i, s in enumerate(rec["steps"]):
            if not s["ids"] and not s["text"]:
                continue
            k = _prefix_key(rec, i)
            if k not in seen and k not in candidates:
                candidates[k] = (rec, i)
    picks = [candidates[k] for k in sorted(candidates)]
    random.Random(seed).shuffle(picks)
    picks = picks[:wanted]
    # Grouped by trajectory, in step order: each worker's KV cache extends as it goes.
    return sorted(picks, key=lambda p: (p[0]["problem"], p[0]["config"], p[0]["repeat"], p[1]))


def check(rec: dict, index: int, problem, pre: Prefixes, max_tokens: int) -> dict:
    small, large = pre.workers["small"], pre.workers["large"]
    sid = f"eval-steps-{rec['config']}-{rec['problem']}-{rec['repeat']}"
    prior = rec["steps"][:index]
    ps, pl = pre.build("small", problem, prior), pre.build("large", problem, prior)
    stop = (pre.think_end,) if pre.think else ()
    gs = small.glimpse(ps, 20, sid + "-s")
    gl = large.glimpse(pl, 20, sid + "-l")
    s_gen = small.generate(ps, max_tokens=max_tokens, stop=stop, session_id=sid + "-s")
    s_text = s_gen.text
    # A small step cut at max_tokens is compared on what it has: the large one may
    # run past it (text mode: its tokens are not the same length) and still agree.
    s_cut = s_gen.finish_reason == wpb.FINISH_REASON_LENGTH

    def consistent(text: str) -> bool:
        return s_text.startswith(text) or (s_cut and text.startswith(s_text))

    l_text, l_tokens, l_finish, cut = "", 0, 0, False
    call = large.generate_stream(pl, max_tokens=max_tokens, stop=stop, session_id=sid + "-l")
    try:
        for chunk in call:
            l_text += chunk.text
            l_tokens += len(chunk.token_ids)
            l_finish = chunk.finish_reason or l_finish
            if not consistent(l_text):
                cut = True  # they differ: stop the large model now
                break
    except KeyboardInterrupt:
        call.cancel()
        raise
    finally:
        if cut:
            call.cancel()
    agree = not cut and (l_text == s_text or (s_cut and (l_finish == wpb.FINISH_REASON_LENGTH or l_text.startswith(s_text))))
    first_same = (gs.token_id == gl.token_id) if pre.token_mode else (gs.token_text == gl.token_text)
    return {
        "kind": "step_check", "config": rec["config"], "problem": rec["problem"], "repeat": rec["repeat"],
        "index": index, "entropy": gs.entropy_top_k,
        "entropy_full": gs.entropy_full if gs.entropy_full >= 0 else None,
        "agree_step": bool(agree), "agree_first": bool(first_same),
        "small_tokens": len(s_gen.token_ids), "large_tokens": l_tokens,
        "small_text": s_text[:300], "large_text": l_text[:300],
        "glimpse_ms": gs.timings.total_ms,
    }


def run(results: ResultsFile, small: WorkerClient, large: WorkerClient, problems: dict, *, n: int, seed: int,
        template: str, max_tokens: int, progress: bool = True) -> int:
    """Check up to n sampled steps (those already in the file count); returns how many ran now."""
    picks = sample(results, n, seed)
    if not picks:
        return 0
    pre = Prefixes(small, large, template)
    ran = 0
    with tqdm(total=len(picks), desc="step analysis", unit="step", disable=not progress, file=sys.stderr) as bar:
        for rec, index in picks:
            problem = problems.get(rec["problem"])
            if problem is None:  # a result from a dataset line no longer loaded
                continue
            results.append(check(rec, index, problem, pre, max_tokens))
            ran += 1
            bar.update(1)
    return ran
