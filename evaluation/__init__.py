"""GlimpRouter's evaluation: accuracy against latency for routing policies and
thresholds, the step-level entropy analysis, and the numbers `make bench` reports.

Entry point: `python -m evaluation --help` (also `glimprouter eval`); see
docs/evaluation.md.
"""
