"""Benchmark harness: changerelay against the tutorial's pattern (see BENCHMARKS.md).

Not part of the test suite. Run ``python -m bench`` (or ``bench/run.sh``); ``--help`` lists the
options.
"""
