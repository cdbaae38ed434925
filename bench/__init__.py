"""Benchmarks for QNTX, run with ``bin/bench <name>`` (SPEC §7).

Every benchmark starts real actor processes in a throwaway home, measures the raw
limit it is judged against in the same run (``bench.raw``), and prints each figure
beside that limit and their ratio: these machines are noisy, so only ratios from
one run compare. ``bench.report`` holds the table and JSON output, ``bench.actors``
the temporary homes and process handling that every benchmark shares.
"""
